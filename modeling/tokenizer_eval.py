"""Tokenizer evaluation: reconstruction PSNR, codebook usage per position, a reconstruction grid."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from modeling.tokenizer import Tokenizer


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (computed on the [0, 1] scale)."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


class CodeCounter:
    """Histogram of codes per token position: [positions, codebook]."""

    def __init__(self, positions: int, codebook: int):
        self.counts = torch.zeros(positions, codebook, dtype=torch.long)

    def add(self, codes: torch.Tensor) -> None:  # codes [B, positions]
        self.counts.scatter_add_(1, codes.t().cpu(), torch.ones_like(codes.t().cpu()))

    def summary(self) -> dict:
        total = self.counts.sum(0)
        p = total.float() / total.sum().clamp_min(1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {
            "codebook_size": self.counts.shape[1],
            "fraction_used": float((total > 0).float().mean()),
            "perplexity": float(entropy.exp()),
            "used_per_position": (self.counts > 0).sum(1).tolist(),
        }


@torch.no_grad()
def evaluate(
    tokenizer: Tokenizer, batches: Iterable[torch.Tensor], max_images: int = 0, grid_images: int = 8
) -> tuple[dict, torch.Tensor]:
    """Metrics over uint8 image batches, and a grid tensor (originals over reconstructions)."""
    tokenizer.eval()
    cfg = tokenizer.cfg
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    visual = CodeCounter(n_patches, cfg.visual_codebook)
    prologue = CodeCounter(cfg.z_len, cfg.prologue_codebook) if cfg.z_len else None
    psnrs, l1s, originals, recons = [], [], [], []
    seen = 0
    for images in batches:
        if max_images:
            images = images[: max_images - seen]
        x = images.float().div(127.5).sub(1)
        recon, enc = tokenizer(x)
        psnrs.append(psnr(recon, x))
        l1s.append((recon.clamp(-1, 1) - x).abs().flatten(1).mean(1))
        visual.add(enc.visual.codes)
        if prologue is not None:
            prologue.add(enc.prologue.codes)
        if len(originals) * x.shape[0] < grid_images:
            originals.append(x)
            recons.append(recon.clamp(-1, 1))
        seen += x.shape[0]
        if max_images and seen >= max_images:
            break
    metrics = {
        "images": seen,
        "psnr_db": float(torch.cat(psnrs).mean()),
        "l1": float(torch.cat(l1s).mean()),
        "visual_codes": visual.summary(),
    }
    if prologue is not None:
        metrics["prologue_codes"] = prologue.summary()
    grid = torch.cat([torch.cat(originals)[:grid_images], torch.cat(recons)[:grid_images]])
    return metrics, ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
