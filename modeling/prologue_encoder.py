"""Prologue-Post's separate prologue encoder: its own transformer over the frozen 2D encoder's patch
outputs and z_len learnable queries; the query outputs go to the prologue quantizer.

The 2D tokenizer is left exactly as trained (its weights are loaded and frozen), so the visual tokens
are the baseline's; only this encoder, the prologue quantizer and the joint prior learn, by the CE.
Paper size: 10 layers, width 512, 8 heads; `TokenizerConfig.post_*` scales it down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from modeling.blocks import Transformer, grid_rope, rope_1d

if TYPE_CHECKING:
    from modeling.tokenizer import TokenizerConfig


class PrologueEncoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.proj_in = nn.Linear(cfg.width, cfg.post_width)  # 2D encoder width -> prologue encoder width
        self.transformer = Transformer(cfg.post_width, cfg.post_depth, cfg.post_heads)
        self.queries = nn.Parameter(torch.randn(cfg.z_len, cfg.post_width) * 0.02)
        head_dim, n = cfg.post_width // cfg.post_heads, cfg.num_patches
        angles = torch.cat([grid_rope(cfg.grid, head_dim), rope_1d(torch.arange(n, n + cfg.z_len), head_dim)])
        self.register_buffer("angles", angles, persistent=False)  # [N + Z, head_dim/2]

    def forward(self, patches: Tensor) -> Tensor:
        """patches [B, N, width] (the 2D encoder's outputs) -> query outputs [B, Z, post_width]."""
        x = self.proj_in(patches)  # [B, N, post_width]
        x = torch.cat([x, self.queries.expand(x.shape[0], -1, -1)], dim=1)  # [B, N + Z, post_width]
        return self.transformer(x, self.angles)[:, patches.shape[1]:]
