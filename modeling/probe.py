"""Linear probe: multinomial logistic regression on frozen, standardised features with a fixed L-BFGS budget.

Used to compare what the prologue tokens know about the class against the first `z_len` tokens of the baseline
tokenizer. Tokens become features two ways: their codebook vectors (`embed_tokens`: the geometry the visual codebook
learns; the prologue codebook's geometry is only shaped through a softmax) and one-hot codes (`one_hot_tokens`: no
geometry at all, so neither token kind is favoured by how its codebook was trained).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embed_tokens(codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """codes [N, L] long, embedding table [K, D] -> flattened features [N, L * D]."""
    assert codes.ndim == 2 and table.ndim == 2 and int(codes.max()) < len(table), (codes.shape, table.shape)
    return F.embedding(codes, table.detach()).flatten(1)  # [N, L, D] -> [N, L * D]


def one_hot_tokens(codes: torch.Tensor, vocab: int) -> torch.Tensor:
    """codes [N, L] long -> one-hot features [N, L * vocab] (float32; keep L * vocab modest: it is dense)."""
    assert codes.ndim == 2 and int(codes.max()) < vocab, (codes.shape, vocab)
    return F.one_hot(codes, vocab).flatten(1).float()  # [N, L, vocab] -> [N, L * vocab]


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
    """Fits W [D, C], b [C] on train_x [N, D] / train_y [N] by full-batch L-BFGS (at most `steps` iterations,
    strong-Wolfe line search) on cross-entropy + weight_decay / 2 * ||W||^2, after standardising the features with
    the training mean and std. Deterministic for a given seed (it draws the small initial weights)."""
    train_x, val_x = train_x.detach().double(), val_x.detach().double()  # float64: a tight, reproducible optimum
    assert train_x.ndim == val_x.ndim == 2 and train_x.shape[1] == val_x.shape[1], (train_x.shape, val_x.shape)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    classes = int(max(train_y.max(), val_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(train_x.shape[1], classes, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=lr, max_iter=steps, history_size=20, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ w + b, train_y) + weight_decay / 2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_logits, val_logits = train_x @ w + b, val_x @ w + b  # [N, C], [M, C]
        return {
            "top1": top1(val_logits, val_y),
            "train_top1": top1(train_logits, train_y),
            "train_loss": float(F.cross_entropy(train_logits, train_y)),
            "val_loss": float(F.cross_entropy(val_logits, val_y)),
            "iterations": int(opt.state[w]["n_iter"]),
            "classes": classes,
            "train_samples": len(train_x),
            "val_samples": len(val_x),
            "features": train_x.shape[1],
        }
