"""Dead-code restarts: re-seed codebook entries that no input chose for a while.

A standard remedy for codebook collapse in VQ training (not part of the Prologue paper's recipe;
off unless `restart_dead_codes_every` > 0): every `every` steps, entries unused since the last
check are replaced by randomly chosen recent projected encoder outputs. Under data parallelism
the counts are summed over ranks and rank 0's choice is broadcast, so ranks stay identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from modeling.quantizers import CosineCodebook


class DeadCodeRestarter:
    def __init__(self, quantizer: CosineCodebook, every: int):
        self.quantizer, self.every = quantizer, every
        self.counts = torch.zeros(quantizer.codebook_size, dtype=torch.long)
        self.recent: Tensor | None = None  # [M, code_dim] projected outputs of the last batch

    @torch.no_grad()
    def observe(self, codes: Tensor, projected: Tensor) -> None:
        self.counts += torch.bincount(codes.flatten().cpu(), minlength=self.counts.numel())
        self.recent = projected.detach().flatten(0, -2)

    @torch.no_grad()
    def maybe_restart(self, step: int, generator: torch.Generator) -> int:
        """Re-seed dead entries when `step` is a multiple of `every`; returns how many."""
        if step % self.every or self.recent is None:
            return 0
        counts = self.counts.clone()
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
        dead = (counts == 0).nonzero().flatten()
        weight = self.quantizer.codebook.weight
        if len(dead) and (not distributed or dist.get_rank() == 0):
            pick = torch.randint(0, self.recent.shape[0], (len(dead),), generator=generator)
            new = self.recent.cpu()[pick] + 0.01 * torch.randn(len(dead), weight.shape[1], generator=generator)
            weight[dead.to(weight.device)] = new.to(weight)
        if distributed and len(dead):
            dist.broadcast(weight.data, src=0)
        self.counts.zero_()
        return len(dead)
