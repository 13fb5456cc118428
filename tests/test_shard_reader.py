"""Streaming shards back from the store into DataLoaders: workers, ranks, shuffling, truncation."""

from __future__ import annotations

import pytest
import torch

from pipelines.profiles import load_profile
from pipelines.shard_reader import TruncatedShard, image_dataset, image_loader
from tests.conftest import shard


@pytest.fixture
def val_shards(store, fashion_mnist):
    """128 tiny val images in 4 shards of 32, in the store under test."""
    return shard(load_profile("tiny", ["data.shard_size=32"]), "val", store)


def _keys(loader_or_ds) -> list[str]:
    return [s["__key__"] for s in loader_or_ds]


def test_loader_batches_with_workers(val_shards):
    loader = image_loader(val_shards.artifact, batch_size=20, num_workers=2)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.shape == (128, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (128,) and 0 <= labels.min() and labels.max() <= 9
    # same multiset of labels as the manifest's per-class counts
    per_class = val_shards.manifest.counts.per_class
    classes = val_shards.manifest.classes
    assert {classes[i]: int(c) for i, c in enumerate(torch.bincount(labels, minlength=10)) if c} == per_class


def test_ranks_and_workers_partition_the_data(val_shards):
    seen = []
    for rank in range(2):
        ds = image_dataset(val_shards.artifact, rank=rank, world_size=2, decode=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        keys = _keys(loader)
        assert len(keys) == 64  # 2 of the 4 shards each
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 128


def test_shuffle_is_seeded_and_complete(val_shards):
    plain = _keys(image_dataset(val_shards.artifact, decode=False))
    a = _keys(image_dataset(val_shards.artifact, decode=False, shuffle=50, seed=1))
    b = _keys(image_dataset(val_shards.artifact, decode=False, shuffle=50, seed=1))
    c = _keys(image_dataset(val_shards.artifact, decode=False, shuffle=50, seed=2))
    assert a == b and a != plain and a != c
    assert sorted(a) == sorted(plain) == sorted(c)


def test_truncated_shard_is_detected(val_shards):
    art = val_shards.artifact
    rel = val_shards.manifest.shards[1]
    data = art.read_bytes(rel)
    art.fs.pipe_file(art.file_path(rel), data[: len(data) // 2])
    with pytest.raises(TruncatedShard, match=r"the manifest records"):
        list(image_dataset(art, decode=False))
    assert any("truncated" in p for p in art.verify())


def test_unmaterialised_artifact_is_refused(store):
    with pytest.raises(FileNotFoundError, match="not materialised"):
        image_dataset(store.artifact("image_shards", "nope"))
