"""PNG helpers shared by the steps: lossless encoding and preview grids for the Dagster UI."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 [B, C, H, W] -> RGB PIL images."""
    arr = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
    return [Image.fromarray(a if a.shape[2] == 3 else a[..., 0]).convert("RGB") for a in arr]


def grid_png(images: list[Image.Image] | torch.Tensor, columns: int = 8) -> bytes:
    """A PNG grid of equally sized images, upscaled so that small images stay visible."""
    if isinstance(images, torch.Tensor):
        images = to_pil(images)
    if not images:
        return b""
    w, h = images[0].size
    scale = max(1, 64 // w)
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (min(columns, len(images)) * w * scale, rows * h * scale))
    for i, img in enumerate(images):
        tile = img.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        grid.paste(tile, ((i % columns) * w * scale, (i // columns) * h * scale))
    return encode_png(grid)


def loss_curves_png(history: list[dict], keys: tuple[str, ...]) -> bytes:
    """One small line plot per logged metric (those of `keys` present in the history)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = tuple(k for k in keys if any(k in h for h in history))
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        pts = [(h["step"], h[k]) for h in history if k in h]
        ax.plot(*zip(*pts, strict=True))
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
