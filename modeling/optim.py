"""Optimisation helpers shared by the stage-1 and stage-3 trainers: schedule, EMA, weight decay."""

from __future__ import annotations

import math

import torch
from torch import nn


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """LR multiplier per step: linear warm-up to 1, then cosine decay to min_ratio at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def ema_with_warmup(decay: float):
    """EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)): early weights fade fast."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        for e, p in zip(ema_params, params, strict=True):
            if e.is_floating_point():
                e.lerp_(p.to(e.dtype), weight)  # the EMA may be kept in float32 beside bf16 weights
            else:  # integer/bool buffers (attention masks) are copied, not averaged
                e.copy_(p)

    return update


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices and embeddings decay; norms and biases (1-D) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
