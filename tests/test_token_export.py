"""Stage 2: the pre-tokenised dataset export and its streaming reader (local folder and S3)."""

from __future__ import annotations

import os
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from pipelines.loaders import load_tokenizer
from pipelines.manifests import Codes
from pipelines.shard_reader import TruncatedShard, image_dataset
from pipelines.store import Store
from pipelines.token_export import VIEWS, SanityCheckFailed, export_tokens, sanity_check, views
from pipelines.token_reader import TokenStream, token_loader
from tests.conftest import copy_store, tiny_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny_graph):
    """Both variants of the tiny profile, as the whole-graph run exported them (read-only)."""
    plan = tiny_plan(Store(str(tiny_graph.root)))
    results = {v: export_tokens(plan, v, progress=False) for v in ("baseline", "prologue")}
    assert all(r.cached for r in results.values())
    return plan.store, plan.profile, results


@pytest.fixture
def exported_copy(tiny_copy):
    """The same, in a private copy of the store (for the tests that delete or rewrite files)."""
    plan = tiny_plan(tiny_copy)
    return plan.store, plan.profile, {v: export_tokens(plan, v, progress=False) for v in ("baseline", "prologue")}


def _parquet_rows(art) -> dict[str, dict]:
    """Rows of the Parquet files read with plain pyarrow.dataset, keyed by (key, aug)."""
    files = sorted(art.fs.ls(art.file_path("parquet"), detail=False))
    table = pads.dataset(files, format="parquet", filesystem=art.fs).to_table()
    return {(r["key"], r["aug"]): r for r in table.to_pylist()}


def _all_rows(art, fmt: str, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batches = list(TokenStream(art, 1000, split=split, fmt=fmt, shuffle=False, epochs=1, rank=0, world_size=1))
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))


def test_manifest_counts_and_formats(exported):
    _, profile, results = exported
    for variant, r in results.items():
        m = r.manifest
        assert m.counts["rows"] == {"train": 512 * 2, "val": 128}  # tiny: flip -> 2 views per train image
        assert m.counts["images"] == {"train": 512, "val": 128}
        z = profile.tokenizer_for(variant).z_len
        assert m.codes == Codes(z_len=z, num_visual=16, visual_codebook=64, prologue_codebook=16 if z else 0)
        assert m.views == VIEWS["flip"]
        assert m.lineage["tokenizer"] and m.sanity["images"] == 128
        assert r.artifact.verify(checksums=True) == []
        # each tiny image shard (128 images) gives 4 row groups of 64 rows (train) or 2 (val)
        assert [f["units"] for f in m.layout["parquet"]["val"]] == [[64, 64]]


def test_parquet_and_webdataset_hold_identical_rows(exported):
    _, _, results = exported
    for r in results.values():
        for split in ("train", "val"):
            p, w = _all_rows(r.artifact, "parquet", split), _all_rows(r.artifact, "wds", split)
            assert all(torch.equal(a, b) for a, b in zip(p, w, strict=True))
            assert len(p[0]) == r.manifest.counts["rows"][split]


def test_rows_are_the_tokenizer_codes_and_decode_to_its_reconstruction(exported):
    store, _, results = exported
    r = results["prologue"]
    tok_art = store.artifact("tokenizer", r.manifest.lineage["tokenizer"])
    tokenizer = load_tokenizer(tok_art)
    rows = _parquet_rows(r.artifact)
    val = store.artifact("image_shards", r.manifest.lineage["image_shards/val"])
    train = store.artifact("image_shards", r.manifest.lineage["image_shards/train"])
    for shards, augs in ((val, (0,)), (train, (0, 1))):
        samples = list(islice(image_dataset(shards, rank=0, world_size=1, decode=False), 24))
        keys = [s["__key__"] for s in samples]
        images = torch.stack([torch.from_numpy(np.array(_png(s["png"]))).permute(2, 0, 1) for s in samples])
        x = images.float().div(127.5).sub(1)
        for aug in augs:
            view = x if aug == 0 else torch.flip(x, dims=[3])
            with torch.no_grad():
                reference, enc = tokenizer(view)
                stored_visual = torch.tensor([rows[(k, aug)]["visual"] for k in keys])
                stored_prologue = torch.tensor([rows[(k, aug)]["prologue"] for k in keys])
                assert torch.equal(stored_visual, enc.visual.codes)
                assert torch.equal(stored_prologue, enc.prologue.codes)
                # the stored codes decode to exactly the tokenizer's own reconstruction
                assert torch.equal(tokenizer.decode_codes(stored_visual), reference)
            assert all(rows[(k, aug)]["label"] == int(s["cls"]) for k, s in zip(keys, samples, strict=True))


def _png(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def test_storage_is_at_most_2_2_bytes_per_token_at_fashion32_block_size(exported, tmp_path):
    # tiny rows are 18 tokens in blocks of 64: tar headers dominate there; at the fashion32 layout
    # (68 tokens per row, 4096-row blocks) both formats must stay within 2.2 bytes per token.
    from pipelines.workers.export import _write_parquet, _write_wds

    store = Store(str(tmp_path / "s"))
    art = store.artifact("token_dataset", "layout")
    rng = np.random.default_rng(0)
    n = 10_000
    rows = {
        "key": [f"train_{i // 2:06d}" for i in range(n)],
        "label": rng.integers(0, 10, n).astype(np.int16),
        "aug": (np.arange(n) % 2).astype(np.uint8),
        "prologue": rng.integers(0, 64, (n, 4)).astype(np.uint16),  # uniform codes: the worst case for zstd
        "visual": rng.integers(0, 512, (n, 64)).astype(np.uint16),
    }
    parquet, _ = _write_parquet(rows, 4096, str(tmp_path), art, "p.parquet")
    tar, blocks = _write_wds(rows, 4096, "train-000000", str(tmp_path), art, "w.tar")
    assert blocks == [4096, 4096, 1808]
    assert parquet["size"] / (n * 68) <= 2.2
    assert tar["size"] / (n * 68) <= 2.2


def test_ten_crop_views():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    v = views(images, "tencrop_flip", 1.125)
    assert v.shape == (10, 3, 3, 32, 32) and len(VIEWS["tencrop_flip"]) == 10
    from torchvision.transforms.v2 import functional as TF

    big = TF.resize(images, [36, 36], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    # corners and centre of the enlarged image; the mirrored image's crops mirror the opposite corners
    assert torch.equal(v[0], big[..., :32, :32]) and torch.equal(v[3], big[..., 4:, 4:])
    assert torch.equal(v[4], big[..., 2:34, 2:34])
    assert torch.equal(v[5], torch.flip(v[1], dims=[3]))
    assert torch.equal(views(images, "flip", 1.125)[1], torch.flip(images, dims=[3]))


def test_reader_shards_ranks_and_workers_without_overlap(exported):
    _, _, results = exported
    art = results["prologue"].artifact
    keyed = {}
    labels, prologue, visual = _all_rows(art, "parquet", "train")
    everything = sorted(map(tuple, torch.cat([labels[:, None], prologue, visual], 1).tolist()))
    seen = []
    for rank in range(2):
        loader = token_loader(art, 50, num_workers=2, seed=5, epochs=1, rank=rank, world_size=2)
        rows = [torch.cat([b[0][:, None], b[1], b[2]], 1) for b in loader]
        keyed[rank] = sorted(map(tuple, torch.cat(rows).tolist()))
        seen += keyed[rank]
    assert sorted(seen) == everything  # every row exactly once across ranks x workers
    assert abs(len(keyed[0]) - len(keyed[1])) <= 64
    shuffled = torch.cat([b[2] for b in TokenStream(art, 100, seed=1, epochs=1, rank=0, world_size=1)])
    assert not torch.equal(shuffled, visual)


@pytest.mark.parametrize("fmt", ["parquet", "wds"])
def test_reader_resumes_exactly_across_epochs(exported, fmt):
    _, _, results = exported
    art = results["prologue"].artifact
    for workers in (0, 2):
        args = dict(num_workers=workers, fmt=fmt, seed=3, rank=0, world_size=1)
        straight = list(islice(token_loader(art, 48, **args), 45))
        for k in (7, 30):  # 1,024 rows per epoch: batch 30 is in the second epoch
            resumed = list(islice(token_loader(art, 48, start_batch=k, **args), 45 - k))
            assert len(resumed) == 45 - k
            for a, b in zip(straight[k:], resumed, strict=True):
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_truncated_token_file_is_detected(exported, tmp_path):
    import shutil

    _, _, results = exported
    copy = Store(str(tmp_path / "copy"))
    src = results["baseline"].artifact
    shutil.copytree(src.path, copy.artifact("token_dataset", src.key).path)
    art = copy.artifact("token_dataset", src.key)
    for rel in ("parquet/val-000000.parquet", "wds/val-000000.tar"):
        data = Path(art.file_path(rel)).read_bytes()
        Path(art.file_path(rel)).write_bytes(data[: len(data) // 2])
    for fmt in ("parquet", "wds"):
        with pytest.raises(TruncatedShard, match="val-000000"):
            _all_rows(art, fmt, "val")


def test_hugging_face_datasets_reads_the_parquet_files(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from datasets import Dataset

    _, _, results = exported
    art = results["prologue"].artifact
    ds = Dataset.from_parquet(art.file_path("parquet/val-000000.parquet"), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 128 and ds.features["visual"].feature.dtype == "uint16"
    _, prologue, visual = _all_rows(art, "parquet", "val")
    assert ds[5]["visual"] == visual[5].tolist() and ds[5]["prologue"] == prologue[5].tolist()


def test_rerun_is_cached_and_a_lost_part_is_redone(exported_copy):
    store, _, results = exported_copy
    plan = tiny_plan(store)
    r = results["baseline"]
    again = export_tokens(plan, "baseline", progress=False)
    assert again.cached and again.artifact.key == r.artifact.key
    # an interrupted export: no manifest, one shard's part missing -> only that shard is redone
    art = r.artifact
    mtimes = {rel: os.path.getmtime(art.file_path(rel)) for rel in r.manifest.files if rel.endswith(".parquet")}
    os.remove(art.file_path("_manifest.json"))
    os.remove(art.file_path("_parts/train-000001.json"))
    resumed = export_tokens(plan, "baseline", progress=False)
    assert not resumed.cached
    assert resumed.manifest.files == r.manifest.files  # byte-identical content
    changed = {rel for rel, t in mtimes.items() if os.path.getmtime(art.file_path(rel)) != t}
    assert changed == {"parquet/train-000001.parquet"}


def test_sanity_check_stops_on_a_psnr_mismatch(exported):
    store, profile, results = exported
    m = results["prologue"].manifest
    tok = store.artifact("tokenizer", m.lineage["tokenizer"])
    val = store.artifact("image_shards", m.lineage["image_shards/val"])
    tok_manifest = tok.manifest()
    recorded = tok_manifest["metrics"]["psnr_db"]
    result, grid = sanity_check(tok, recorded, val, profile.tokens)
    assert abs(result["psnr_db"] - recorded) < 1e-3  # tiny: the same 128 images
    assert grid.shape == (16, 3, 32, 32)
    with pytest.raises(SanityCheckFailed, match="sanity_tolerance_db"):
        sanity_check(tok, recorded + 3, val, profile.tokens)


def test_export_and_read_on_s3(s3_endpoint, tiny_graph):
    import uuid

    store = Store(f"s3://prologue-test/{uuid.uuid4().hex[:8]}", {"client_kwargs": {"endpoint_url": s3_endpoint}})
    copy_store(tiny_graph.root, store, ("image_shards", "tokenizer"))  # upstream on S3: the export runs there
    r = export_tokens(tiny_plan(store), "prologue", progress=False)
    assert not r.cached
    assert r.artifact.uri.startswith("s3://") and r.artifact.verify(checksums=True) == []
    p, w = _all_rows(r.artifact, "parquet", "val"), _all_rows(r.artifact, "wds", "val")
    assert all(torch.equal(a, b) for a, b in zip(p, w, strict=True)) and len(p[0]) == 128
    batches = list(islice(token_loader(r.artifact, 64, num_workers=2, seed=0), 25))
    assert len(batches) == 25 and all(b[2].shape == (64, 16) for b in batches)  # 1,600 rows: into epoch 2


def test_two_encoding_processes_write_the_same_files(exported, tmp_path):
    store, _, results = exported
    r = results["prologue"]
    other = Store(str(tmp_path / "two"))
    import shutil

    for asset in ("image_shards", "tokenizer"):  # reuse the upstream artefacts: only the export reruns
        shutil.copytree(f"{store.root}/{asset}", f"{other.root}/{asset}")
    two = export_tokens(tiny_plan(other, ["tokens.processes=2"]), "prologue", progress=False)
    assert not two.cached and two.artifact.key == r.artifact.key  # parallelism is not part of the key
    data = {rel: rec for rel, rec in r.manifest.files.items() if rel.startswith(("parquet/", "wds/"))}
    assert len(data) == 10 and all(two.manifest.files[rel] == rec for rel, rec in data.items())  # same bytes
