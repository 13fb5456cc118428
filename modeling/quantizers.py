"""Cosine-similarity vector quantizers: one for visual tokens (VQ loss), one for prologue tokens.

Both project the encoder output to a small `code_dim`, L2-normalise it and pick the codebook entry
(also L2-normalised) with the highest cosine similarity. They differ in how gradient gets past the
argmax: the visual quantizer copies it straight through to the projected vector and trains the
codebook with a VQ loss; the prologue quantizer passes it through a softmax over the similarities
("probabilistic straight-through"), so that the joint AR model's CE loss can train it.

Both straight-through sums are written as `hard + (soft - soft.detach())`: the bracket is exactly 0,
so the forward value equals the hard value bit for bit (`soft + (hard - soft).detach()` is only
equal up to rounding, which would make decoding codes differ from decoding the forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class VisualQuantized:
    codes: Tensor  # [B, N] long, codebook indices
    quantized: Tensor  # [B, N, code_dim], value of the codebook rows, gradient to the projection
    loss: Tensor  # scalar, codebook term + beta * commitment term
    perplexity: Tensor  # scalar, exp(entropy) of the code histogram of the batch (1..codebook_size)
    usage: Tensor  # scalar, fraction of the codebook used in the batch (0..1]
    projected: Tensor  # [B, N, code_dim] unit vectors before quantization (for codebook restarts)


@dataclass
class PrologueQuantized:
    codes: Tensor  # [B, Z] long
    onehot: Tensor  # [B, Z, K] float, exactly one-hot in value, softmax(sim / temperature) in gradient
    entropy_loss: Tensor  # scalar, mean per-sample entropy - entropy of the batch mean, per position
    perplexity: Tensor  # scalar
    usage: Tensor  # scalar
    projected: Tensor  # [B, Z, code_dim] unit vectors before quantization (for codebook restarts)


def usage_stats(codes: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """(perplexity, fraction of entries used) of the codes in this batch; no gradient."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum()
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


class CosineCodebook(nn.Module):
    """Linear projection to code_dim + L2 normalisation, and an L2-normalised codebook."""

    def __init__(self, in_dim: int, code_dim: int, codebook_size: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.proj = nn.Linear(in_dim, code_dim)
        self.codebook = nn.Embedding(codebook_size, code_dim)

    def project(self, x: Tensor) -> Tensor:
        """[..., in_dim] -> unit vectors [..., code_dim]."""
        return F.normalize(self.proj(x), dim=-1)

    def entries(self) -> Tensor:
        """The normalised codebook [K, code_dim]."""
        return F.normalize(self.codebook.weight, dim=-1)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codes [B, N] -> normalised codebook rows [B, N, code_dim]."""
        return F.embedding(codes, self.entries())


class VisualQuantizer(CosineCodebook):
    def __init__(self, in_dim: int, code_dim: int, codebook_size: int, beta: float = 0.25):
        super().__init__(in_dim, code_dim, codebook_size)
        self.beta = beta

    def forward(self, x: Tensor) -> VisualQuantized:
        z = self.project(x)  # [B, N, c]
        entries = self.entries()  # [K, c]
        codes = (z @ entries.T).argmax(-1)  # [B, N], max cosine similarity
        q = F.embedding(codes, entries)  # [B, N, c]
        # Codebook term moves entries to the encoder outputs; commitment term keeps outputs near entries.
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        quantized = q + (z - z.detach())  # straight-through: value q, gradient to z
        perplexity, usage = usage_stats(codes, self.codebook_size)
        return VisualQuantized(codes, quantized, loss, perplexity, usage, z)


class PrologueQuantizer(CosineCodebook):
    def __init__(self, in_dim: int, code_dim: int, codebook_size: int, temperature: float = 0.1):
        super().__init__(in_dim, code_dim, codebook_size)
        self.temperature = temperature

    def forward(self, x: Tensor) -> PrologueQuantized:
        z = self.project(x)  # [B, Z, c]
        sim = z @ self.entries().T  # [B, Z, K] cosine similarities
        codes = sim.argmax(-1)  # [B, Z]
        hard = F.one_hot(codes, self.codebook_size).to(sim.dtype)
        soft = torch.softmax(sim / self.temperature, dim=-1)
        onehot = hard + (soft - soft.detach())  # probabilistic straight-through (see module docstring)
        perplexity, usage = usage_stats(codes, self.codebook_size)
        return PrologueQuantized(codes, onehot, entropy_loss(soft), perplexity, usage, z)


def entropy_loss(soft: Tensor) -> Tensor:
    """soft [B, Z, K] -> mean entropy of each assignment minus entropy of the batch's average assignment
    per position: low when every image picks one code confidently and the batch spreads over many."""

    def entropy(p: Tensor) -> Tensor:
        return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)

    return entropy(soft).mean() - entropy(soft.mean(0)).mean()
