"""Sharding raw images into the store: counts, byte-exact round trip, corrupt input, cache, resume."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.images import encode_png
from pipelines.profiles import load_profile
from pipelines.shard_reader import image_dataset
from pipelines.sharding import transform
from pipelines.sources import open_source
from pipelines.store import Store
from tests.conftest import shard

ROOT = Path(__file__).resolve().parents[1]


def _idx_labels(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=8)


def _mtimes(store: Store, manifest, art) -> dict:
    out = {}
    for rel in manifest.shards:
        info = store.fs.info(art.file_path(rel))
        out[rel] = info.get("mtime") or info.get("LastModified") or info.get("created")
    return out


def test_tiny_shards_round_trip_byte_exact(store, fashion_mnist):
    profile = load_profile("tiny")
    result = shard(profile, "train", store)
    m = result.manifest
    assert not result.cached
    assert m.counts.samples == 512 and m.counts.corrupt == 0
    assert m.counts.shards == 4 and len(m.shards) == 4
    assert sum(m.counts.per_class.values()) == 512
    assert result.artifact.verify(checksums=True) == []

    samples = list(image_dataset(result.artifact, decode=False))
    assert [s["__key__"] for s in samples] == [f"train_{i:06d}" for i in range(512)]
    labels = _idx_labels(fashion_mnist / "train-labels-idx1-ubyte.gz")[:512]
    assert [int(s["cls"]) for s in samples] == labels.tolist()

    source = open_source("idx", str(fashion_mnist), "train")
    items = source.items()[:512]
    for s, item in zip(samples, items, strict=True):
        original = source.read(item)
        # the stored PNG is byte-identical to encoding the transformed source image
        assert s["png"] == encode_png(transform(original, 32, "pad"))
        # and it decodes to the original 28x28 pixels, padded by 2 and repeated to RGB
        px = np.asarray(Image.open(io.BytesIO(s["png"])))
        assert px.shape == (32, 32, 3)
        assert (px[2:30, 2:30, 0] == np.asarray(original)).all() and (px[..., 0] == px[..., 2]).all()
        assert px[:2].max() == 0 and px[30:].max() == 0
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["class"] == source.classes[meta["label"]]

    # the same request again is a cache hit that rewrites nothing (no timing: listing hashes the
    # source, which on 512 tiny images can take as long as sharding them; bench/ measures speed)
    before = _mtimes(store, m, result.artifact)
    again = shard(profile, "train", store)
    assert again.cached and again.artifact.key == result.artifact.key and again.manifest == m
    assert _mtimes(store, m, again.artifact) == before


def test_shard_assignment_is_independent_of_worker_count(tmp_path, fashion_mnist):
    one = shard(load_profile("tiny", ["data.workers=1"]), "val", Store(str(tmp_path / "a")))
    two = shard(load_profile("tiny", ["data.workers=2", "data.shard_size=32"]), "val",
                      Store(str(tmp_path / "b")))
    assert one.artifact.key != two.artifact.key  # shard size is part of the config
    keys1 = [s["__key__"] for s in image_dataset(one.artifact, decode=False)]
    keys2 = [s["__key__"] for s in image_dataset(two.artifact, decode=False)]
    assert keys1 == keys2 and len(keys1) == 128
    three = shard(load_profile("tiny", ["data.workers=1", "data.shard_size=32"]), "val",
                        Store(str(tmp_path / "c")))
    # workers do not enter the cache key, and the bytes are identical
    assert three.artifact.key == two.artifact.key
    assert three.manifest.files == two.manifest.files


def test_corrupt_images_are_counted_and_skipped(store, photo_folder):
    root, n = photo_folder
    profile = load_profile("tiny", {"data": {"val": {"kind": "folder", "url": str(root), "limit": 0},
                                             "resize": "center_crop", "resolution": 48, "shard_size": 8},
                                    "tokenizer": {"image_size": 48}})
    result = shard(profile, "val", store)
    counts = result.manifest.counts
    assert counts.source_items == n + 1
    assert counts.corrupt == 1 and counts.samples == n
    assert result.manifest.corrupt_keys == ["n00000001_broken"]
    samples = list(image_dataset(result.artifact))
    assert len(samples) == n
    assert all(img.shape == (3, 48, 48) for img, _ in samples)
    assert sorted({label for _, label in samples}) == [0, 1, 2]


def _run_cli(store_url: str, *extra: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.sharding", "--profile", "tiny", "--store", store_url, "--split", "train",
           "--no-progress", "--set", "data.train.limit=6000", "--set", "data.shard_size=50", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_killed_sharder_resumes_to_the_same_result(tmp_path, fashion_mnist):
    store = Store(str(tmp_path / "killed"))
    proc = _run_cli(store.url, "--set", "data.workers=2", start_new_session=True)
    parts = []
    deadline = time.time() + 120
    while time.time() < deadline and len(parts) < 5:
        parts = list(Path(store.url).glob("image_shards/*/_parts/*.json"))
        time.sleep(0.05)
    assert len(parts) >= 5, "sharder produced no parts"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its spawned workers, mid-run
    proc.wait()
    art_dir = parts[0].parents[1]
    assert not (art_dir / "_manifest.json").exists()
    assert len(list(art_dir.glob("_parts/*.json"))) < 120

    resumed = _run_cli(store.url, "--set", "data.workers=2")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resuming image_shards[train]" in out

    clean = _run_cli(str(tmp_path / "clean"), "--set", "data.workers=1")
    assert clean.wait(timeout=300) == 0
    m_resumed = json.loads((art_dir / "_manifest.json").read_text())
    m_clean = json.loads(next((tmp_path / "clean").glob("image_shards/*/_manifest.json")).read_text())
    assert m_resumed["counts"] == m_clean["counts"] and m_resumed["counts"]["samples"] == 6000
    assert m_resumed["files"] == m_clean["files"]  # same bytes, shard for shard
    assert store.artifact("image_shards", art_dir.name).verify(checksums=True) == []


@pytest.mark.parametrize("split,expected", [("train", 60000), ("val", 10000)])
def test_full_fashion_mnist_counts(tmp_path, fashion_mnist, split, expected):
    """The fashion32 acceptance numbers, on the real data set (about 20 s for both splits)."""
    result = shard(load_profile("fashion32"), split, Store(str(tmp_path)))
    c = result.manifest.counts
    assert c.samples == expected and c.corrupt == 0 and c.source_items == expected
    assert sum(c.per_class.values()) == expected and len(c.per_class) == 10
    assert c.shards == -(-expected // 5000)
