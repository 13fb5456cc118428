"""Previews that scale: grids of at most 16 classes, large PNGs linked instead of inlined."""

from __future__ import annotations

import numpy as np
import torch

from assets.data import INLINE_LIMIT, png_markdown
from pipelines.images import grid_png
from pipelines.sampling import PREVIEW_CLASSES, preview_shards
from pipelines.store import Store


def test_grids_read_the_first_shard_of_the_first_16_classes_only():
    layout = [f"samples/cfg-c{c:04d}-{i:03d}.tar" for c in range(1000) for i in range(3)]
    shards = preview_shards(layout)
    assert PREVIEW_CLASSES == 16 and shards == [f"samples/cfg-c{c:04d}-000.tar" for c in range(16)]
    assert preview_shards(layout[:30]) == [f"samples/cfg-c{c:04d}-000.tar" for c in range(10)]  # 10 classes: all


def test_a_small_png_is_inlined_and_a_large_one_linked(tmp_path):
    art = Store(str(tmp_path)).artifact("samples", "k")
    small = grid_png(torch.zeros(8, 3, 32, 32, dtype=torch.uint8))
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 3, 256, 256), dtype=np.uint8))
    large = grid_png(noise)  # incompressible: well over 1 MB
    art.put_bytes("small.png", small)
    art.put_bytes("large.png", large)
    assert len(small) < INLINE_LIMIT < len(large)
    assert png_markdown(art, "small.png", "tiny grid").value.startswith("![tiny grid](data:image/png;base64,")
    linked = png_markdown(art, "large.png", "big grid").value
    assert linked.startswith(f"[big grid]({art.file_uri('large.png')})") and "not inlined" in linked
    assert "base64" not in linked
