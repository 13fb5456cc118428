"""Transformer building blocks: RMSNorm, GEGLU MLP, rotary position embeddings, attention, blocks.

Shapes: B batch, T tokens, D width, H heads, d = D / H head dim.

Rotary positions travel as an angle table [T, d/2]: one rotation angle per token and per pair of
head channels (channels 2j, 2j+1 form pair j). `rope_1d` builds it for sequence positions,
`rope_2d` / `grid_rope` for patch grids; callers concatenate tables along T to mix 2D patch
positions with 1D positions for extra tokens (e.g. the encoder's query tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROPE_BASE = 10000.0


def rope_1d(positions: Tensor, head_dim: int) -> Tensor:
    """Angles [T, head_dim/2] for integer positions [T]: pair j turns by position * BASE^(-j / pairs)."""
    pairs = head_dim // 2
    inv_freq = ROPE_BASE ** (-torch.arange(pairs, dtype=torch.float32) / pairs)
    return positions.float()[:, None] * inv_freq[None, :]


def rope_2d(rows: Tensor, cols: Tensor, head_dim: int) -> Tensor:
    """Angles [T, head_dim/2] for tokens at (row, col): the first half of the head dim rotates with the
    row, the second half with the column (each half is a 1D rotary embedding of head_dim/2 channels)."""
    return torch.cat([rope_1d(rows, head_dim // 2), rope_1d(cols, head_dim // 2)], dim=-1)


def grid_rope(side: int, head_dim: int) -> Tensor:
    """Angles [side*side, head_dim/2] for a square patch grid in raster order (row-major)."""
    idx = torch.arange(side)
    return rope_2d(idx.repeat_interleave(side), idx.repeat(side), head_dim)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each channel pair of x [B, H, T, d] by the angles whose cos/sin are [T, d/2]."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, H, T, d/2] each
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 so that bf16 activations do not lose the mean square.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class MLP(nn.Module):
    """GEGLU feed-forward: (GELU(x W_gate) * x W_up) W_down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)  # value and gate in one matmul
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(value * F.gelu(gate))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        """mask: optional bool [T, T], True where query row t may attend to key column s."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, T, d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)  # [B, H, T, d]
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = RMSNorm(dim)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks and a final RMSNorm. `angles` [T, d/2] gives every token its rotary position."""

    def __init__(self, dim: int, depth: int, heads: int, causal: bool = False):
        super().__init__()
        self.head_dim = dim // heads
        self.blocks = nn.ModuleList(Block(dim, heads, causal) for _ in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, x: Tensor, angles: Tensor, mask: Tensor | None = None) -> Tensor:
        assert angles.shape == (x.shape[1], self.head_dim // 2), f"angles {tuple(angles.shape)} for x {tuple(x.shape)}"
        cos, sin = angles.cos(), angles.sin()  # once per forward, shared by all blocks
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.norm(x)
