"""Linear probe: multinomial logistic regression on frozen, standardised features with a fixed L-BFGS budget.

Used to compare what the prologue tokens know about the class against the first `z_len` tokens of the baseline
tokenizer. Tokens become features two ways: their codebook vectors (`embed_tokens`: the geometry the visual codebook
learns; the prologue codebook's geometry is only shaped through a softmax) and one-hot codes (`one_hot_tokens`: no
geometry at all, so neither token kind is favoured by how its codebook was trained).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def embed_tokens(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """codes [N, L] long, embedding table [K, D] -> flattened features [N, L * D]."""
    assert codes.ndim == 2 and table.ndim == 2 and int(codes.max()) < len(table), (codes.shape, table.shape)
    return F.embedding(codes, table.detach()).flatten(1)  # [N, L, D] -> [N, L * D]


@dataclass(frozen=True)
class OneHot:
    """Tokens as one-hot features, never materialised: codes [N, L] long in 0..vocab-1 stand for the
    features [N, L * vocab] that are 1 at column l * vocab + codes[n, l] and 0 elsewhere. The probe
    multiplies them by gathering rows (N * L work instead of N * L * vocab: the dense matrix of 8 tokens
    of a 512-code book over 120,000 rows would be 3.9 GB of float64)."""

    codes: torch.Tensor
    vocab: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1] * self.vocab)

    def columns(self) -> torch.Tensor:
        """The column of each 1: [N, L] long."""
        return self.codes + self.vocab * torch.arange(self.codes.shape[1])

    def dense(self) -> torch.Tensor:
        """The features [N, L * vocab] float32 (for small inputs and checks)."""
        return F.one_hot(self.codes, self.vocab).flatten(1).float()  # [N, L, vocab] -> [N, L * vocab]


def one_hot_tokens(codes: torch.Tensor, vocab: int) -> OneHot:
    """codes [N, L] long -> their one-hot features [N, L * vocab] (as a `OneHot`: gathered, not stored)."""
    assert codes.ndim == 2 and int(codes.max()) < vocab, (codes.shape, vocab)
    return OneHot(codes, vocab)


class _Standardised:
    """x -> ((x - mean) / std) @ w + b with the training split's column mean and std (std clamped at
    1e-6, so a constant column contributes nothing), for dense features or `OneHot` ones."""

    def __init__(self, train_x: torch.Tensor | OneHot):
        if isinstance(train_x, OneHot):
            n, width = train_x.shape
            ones = torch.bincount(train_x.columns().flatten(), minlength=width).double()  # [L * vocab]
            self.mean = ones / n
            # unbiased variance of a 0/1 column, as torch.std: (sum x^2 - n mean^2) / (n - 1)
            self.std = ((ones - n * self.mean.square()).clamp_min(0) / (n - 1)).sqrt().clamp_min(1e-6)
        else:
            x = train_x.detach().double()
            self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)

    def prepare(self, x: torch.Tensor | OneHot) -> torch.Tensor:
        """What `logits` reads: the standardised dense features [N, D] float64, or the one-hot columns [N, L]."""
        if isinstance(x, OneHot):
            return x.columns()
        return (x.detach().double() - self.mean) / self.std

    def logits(self, prepared: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if prepared.is_floating_point():
            return prepared @ w + b  # [N, C]
        # sum over the 1s of (x / std) @ w, minus (mean / std) @ w: the same product, gathered
        scaled = w / self.std[:, None]  # [D, C]
        return F.embedding_bag(prepared, scaled, mode="sum") - (self.mean / self.std) @ w + b


def top1(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict:
    """Fits W [D, C], b [C] on train_x [N, D] / train_y [N] (dense features or `OneHot` codes) by full-batch
    L-BFGS (at most `steps` iterations, strong-Wolfe line search) on cross-entropy + weight_decay / 2 * ||W||^2,
    after standardising the features with the training mean and std; in float64 (a tight, reproducible
    optimum). Deterministic for a given seed (it draws the small initial weights)."""
    shapes = (tuple(train_x.shape), tuple(val_x.shape))
    assert len(shapes[0]) == len(shapes[1]) == 2 and shapes[0][1] == shapes[1][1], shapes
    features = train_x.shape[1]
    standardise = _Standardised(train_x)
    train_x, val_x = standardise.prepare(train_x), standardise.prepare(val_x)
    classes = int(max(train_y.max(), val_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(features, classes, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=lr, max_iter=steps, history_size=20, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(standardise.logits(train_x, w, b), train_y) + weight_decay / 2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_logits, val_logits = standardise.logits(train_x, w, b), standardise.logits(val_x, w, b)  # [N, C], [M, C]
        return {
            "top1": top1(val_logits, val_y),
            "train_top1": top1(train_logits, train_y),
            "train_loss": float(F.cross_entropy(train_logits, train_y)),
            "val_loss": float(F.cross_entropy(val_logits, val_y)),
            "iterations": int(opt.state[w]["n_iter"]),
            "classes": classes,
            "train_samples": len(train_x),
            "val_samples": len(val_x),
            "features": features,
        }
