"""The results table's figures: samples side by side, metrics against the training budget."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipelines.figures import GAP, LABEL_HEIGHT, budget_png, budget_series, other_seeds, side_by_side
from pipelines.images import grid_png


def _grid(value: int, rows: int) -> bytes:
    """A grid of 8 x rows uniform 32x32 samples of one grey value (grid_png upscales them to 64 px)."""
    return grid_png(torch.full((8 * rows, 3, 32, 32), value, dtype=torch.uint8), columns=8)


def test_each_variant_gets_a_column_with_its_grids_at_the_tile_size():
    grids = {
        "baseline": {"no CFG": _grid(50, 10), "CFG": _grid(100, 10)},
        "prologue": {"no CFG": _grid(200, 10), "CFG": _grid(250, 10)},
    }
    img = np.asarray(Image.open(io.BytesIO(side_by_side(grids, tile=16))))
    width = 8 * 16  # 8 samples per row at 16 px
    assert img.shape == (3 * LABEL_HEIGHT + 2 * (10 * 16 + GAP), 2 * width + GAP, 3)
    top = 2 * LABEL_HEIGHT  # below the variant's name and the first caption
    assert (img[top + 5, 5] == 50).all() and (img[top + 5, width + GAP + 5] == 200).all()
    second = top + 10 * 16 + GAP + LABEL_HEIGHT
    assert (img[second + 5, 5] == 100).all() and (img[second + 5, width + GAP + 5] == 250).all()
    assert (img[top - LABEL_HEIGHT // 2, :] < 255).any()  # a caption is drawn


def _row(variant: str, ar_steps: int, tok_steps: int, fd: float) -> dict:
    return {"variant": variant, "ar_steps": ar_steps, "tokenizer_steps": tok_steps, "fd_domain_nocfg": fd,
            "fd_domain_nocfg_std": 0.5}  # fmt: skip


def test_budget_series_pair_each_arm_with_its_longer_runs():
    rows = [_row("baseline", 800, 1500, 20.0), _row("prologue", 800, 1500, 18.0),
            _row("baseline_ar4x", 3200, 1500, 15.0), _row("prologue_tok3x", 800, 4500, 16.0),
            _row("prologue_post", 800, 1500, 17.0), _row("baseline_s1", 800, 1500, 22.0)]  # fmt: skip
    series = budget_series(rows)
    assert {a: [r["variant"] for r in rs] for a, rs in series["AR steps"].items()} == {
        "baseline": ["baseline", "baseline_ar4x"]
    }
    assert {a: [r["variant"] for r in rs] for a, rs in series["tokenizer steps"].items()} == {
        "prologue": ["prologue", "prologue_tok3x"]
    }
    assert [r["variant"] for r in other_seeds(rows, "baseline")] == ["baseline_s1"]  # a point, not a line
    assert other_seeds(rows, "prologue") == []
    png = budget_png(rows, {"fd_domain_nocfg": "FD-domain, no CFG"})
    assert png is not None and Image.open(io.BytesIO(png)).size[1] > 200  # two rows of plots
    assert budget_png(rows[:2], {"fd_domain_nocfg": "FD-domain, no CFG"}) is None  # no budget varies
