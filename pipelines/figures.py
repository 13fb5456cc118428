"""The results table's figures: every variant's samples side by side, and the key metrics against
the training budget (where the profile varies it).

Both are drawn from stored artefacts only: the sample grids each `samples` artefact holds and the
table's rows.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageDraw

from pipelines.images import encode_png
from pipelines.variants import group_rows, parse_variant

LABEL_HEIGHT = 14
GAP = 6


def side_by_side(grids: Mapping[str, Mapping[str, bytes]], tile: int = 32) -> bytes:
    """One column per variant ({variant: {"no CFG": png, "CFG": png}}): its name on top, then each
    grid under its own caption, every grid scaled to `tile` pixels per sample."""
    columns = []
    for variant, by_caption in grids.items():
        parts = [(variant, None)] + [(caption, Image.open(io.BytesIO(png)).convert("RGB"))
                                     for caption, png in by_caption.items()]  # fmt: skip
        columns.append([(text, _scaled(img, tile) if img is not None else None) for text, img in parts])
    width = max(img.width for col in columns for _, img in col if img is not None)
    height = max(sum(LABEL_HEIGHT + (img.height + GAP if img is not None else 0) for _, img in col) for col in columns)
    canvas = Image.new("RGB", (len(columns) * (width + GAP) - GAP, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, col in enumerate(columns):
        x, y = i * (width + GAP), 0
        for text, img in col:
            draw.text((x + 2, y + 1), text, fill="black")
            y += LABEL_HEIGHT
            if img is not None:
                canvas.paste(img, (x, y))
                y += img.height + GAP
    return encode_png(canvas)


def _scaled(img: Image.Image, tile: int) -> Image.Image:
    """A grid of 8 samples per row, resized so that each sample is `tile` pixels wide."""
    factor = tile * 8 / img.width
    return img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.NEAREST)


BUDGETS = {  # x axis: the row column that counts the budget, and how a variant's budget group is named
    "AR steps": ("ar_steps", lambda v: v.tokenizer_variant),
    "tokenizer steps": ("tokenizer_steps", lambda v: v.without_tokenizer_budget),
}


def budget_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{budget axis: {arm: its rows in budget order}} for every arm the profile trains at two or more
    budgets (`baseline`, `baseline_ar4x`, ...); rows of another training seed (`_s<S>`) are left out
    (see `other_seeds`)."""
    first_seed = [r for r in rows if parse_variant(r["variant"]).seed is None]
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for axis, (column, group_of) in BUDGETS.items():
        series = {arm: sorted(rs, key=lambda r: r[column]) for arm, rs in group_rows(first_seed, group_of).items()
                  if len({r[column] for r in rs}) > 1}  # fmt: skip
        if series:
            out[axis] = series
    return out


def other_seeds(rows: list[dict[str, Any]], arm: str) -> list[dict[str, Any]]:
    """The rows that repeat a series' arm with another training seed (`baseline_s1` for `baseline`): the
    training spread, drawn as points beside the line."""
    return [r for r in rows if (v := parse_variant(r["variant"])).seed is not None and v.seed_group == arm]


def budget_png(rows: list[dict[str, Any]], figures: Mapping[str, str]) -> bytes | None:
    """Each of `figures` ({row column: title}) against each budget the profile varies, one line per
    arm, error bars the std over sampling runs, hollow points the arm's other training seeds (the
    training spread, usually much wider); None when no budget varies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = budget_series(rows)
    if not series:
        return None
    fig, axes = plt.subplots(len(series), len(figures), figsize=(3.6 * len(figures), 2.9 * len(series)),
                             squeeze=False)  # fmt: skip
    for row_axes, (axis, arms) in zip(axes, series.items(), strict=True):
        column = BUDGETS[axis][0]
        for ax, (figure, title) in zip(row_axes, figures.items(), strict=True):
            for arm, rs in arms.items():
                spread = [r.get(f"{figure}_std") or 0 for r in rs]
                line = ax.errorbar([r[column] for r in rs], [r[figure] for r in rs], yerr=spread, marker="o",
                                   capsize=3, label=arm)  # fmt: skip
                seeds = other_seeds(rows, arm)
                if seeds:  # hollow: the same arm and budget, another training seed
                    ax.scatter([r[column] for r in seeds], [r[figure] for r in seeds], facecolors="none",
                               edgecolors=line[0].get_color(), label=f"{arm}, other training seeds")  # fmt: skip
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(axis, fontsize=8)
            ax.tick_params(labelsize=7)
        row_axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
