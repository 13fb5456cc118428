"""Worker of the `token_dataset` step: one encoding rank (every processes-th image shard).

Each image shard becomes one Parquet file and one WebDataset tar of the same rows, recorded as a
part, so a killed export resumes. Once every rank is done, rank 0 reports the export's counts (rows,
images, tokens, bytes per token: `token_export.summarise` over the parts, what the parent commits)
through Dagster Pipes when launched by it. Started as `python -m pipelines.workers.export`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image

from modeling.config import from_dict
from pipelines.launch import worker_context
from pipelines.loaders import load_tokenizer
from pipelines.manifests import ShardsManifest, read
from pipelines.profiles import TokenExportConfig
from pipelines.shard_reader import image_dataset
from pipelines.store import Artifact, Store
from pipelines.token_export import ASSET, VIEWS, encode, parquet_schema, summarise, tasks, views
from pipelines.workers import join_ranks, report, say, worker_main


def run(store: Store, key: str, progress: bool) -> None:
    ctx = worker_context()
    rank, world, device = ctx.rank, ctx.world, ctx.device
    artifact = store.artifact(ASSET, key)
    spec = artifact.read_json("spec.json")
    cfg = from_dict(TokenExportConfig, spec["tokens"])
    tokenizer = load_tokenizer(store.artifact("tokenizer", spec["tokenizer"]), device)
    shards = {s: store.artifact("image_shards", k) for s, k in spec["shards"].items()}
    manifests = {s: read(a, "image_shards") for s, a in shards.items()}
    done, todo = artifact.parts(), tasks({s: m.shards for s, m in manifests.items()})
    mine = [t for t in todo[rank::world] if t[0] not in done]
    total = sum(_shard_images(manifests[s], rel) for _, s, rel in mine)
    bar = ctx.progress(total, unit="img", enabled=progress)
    for name, split, rel in mine:
        t0 = time.perf_counter()
        augment = cfg.augment if split == "train" else "none"
        part = write_shard(
            artifact, name, shards[split], manifests[split], rel, tokenizer, device, cfg, augment, on_images=bar.update
        )
        rate = part["images"] / (time.perf_counter() - t0)
        say(f"rank {rank}: {name}: {part['images']} images -> {part['rows']} rows ({rate:.0f} img/s)")
    bar.close()
    join_ranks(world)
    if rank == 0:
        parts = artifact.parts()
        if all(name in parts for name, _, _ in todo):  # else the parent names what is missing
            _, _, counts = summarise(parts, todo, spec["codes"])
            say(f"{counts['rows']['train']} train / {counts['rows']['val']} val rows, {counts['tokens']} tokens")
            report(artifact, {"counts": counts})


def _shard_images(manifest: ShardsManifest, rel: str) -> int:
    """Images in one shard, from the shard size and the split's total (only the last is short)."""
    size, total = manifest.config["shard_size"], manifest.counts.samples
    return min(size, total - manifest.shards.index(rel) * size)


def _decode_sample(sample: dict) -> tuple[str, torch.Tensor, int]:
    rgb = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    return sample["__key__"], torch.from_numpy(rgb.copy()).permute(2, 0, 1), int(sample["cls"])


def write_shard(
    artifact: Artifact,
    name: str,
    shards: Artifact,
    manifest: ShardsManifest,
    rel: str,
    tokenizer,
    device: torch.device,
    cfg: TokenExportConfig,
    augment: str,
    on_images=lambda n: None,
) -> dict:
    """Encode one image shard into one Parquet file and one WebDataset tar; record the part."""
    samples = image_dataset(shards, manifest, rank=0, world_size=1, decode=False, shards=[rel])
    rows = _encode_rows(samples, tokenizer, device, cfg, augment, on_images)
    n = len(rows["key"])
    files, units = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        files[f"parquet/{name}.parquet"], units["parquet"] = _write_parquet(
            rows, cfg.rows_per_group, tmp, artifact, f"parquet/{name}.parquet"
        )
        files[f"wds/{name}.tar"], units["wds"] = _write_wds(
            rows, cfg.rows_per_group, name, tmp, artifact, f"wds/{name}.tar"
        )
    part = {
        "files": files,
        "rows": n,
        "images": n // len(VIEWS[augment]),
        "parquet": {"file": f"parquet/{name}.parquet", "units": units["parquet"]},
        "wds": {"file": f"wds/{name}.tar", "units": units["wds"]},
    }
    artifact.record_part(name, part)
    return part


def _encode_rows(samples, tokenizer, device, cfg: TokenExportConfig, augment: str, on_images) -> dict:
    """Every view of every sample, encoded in batches: columns key, label, aug, prologue, visual."""
    keys, labels, augs, prologues, visuals = [], [], [], [], []
    batch: list[tuple[str, torch.Tensor, int]] = []

    def flush() -> None:
        images = torch.stack([img for _, img, _ in batch])
        stacked = views(images, augment, cfg.crop_scale)  # [V, B, C, H, W]
        V, B = stacked.shape[:2]
        flat = stacked.transpose(0, 1).flatten(0, 1)  # [B * V, C, H, W], image-major
        for i in range(0, len(flat), cfg.batch_size):
            p, v = encode(tokenizer, flat[i : i + cfg.batch_size], device)
            prologues.append(p)
            visuals.append(v)
        for key, _, label in batch:
            keys.extend([key] * V)
            labels.extend([label] * V)
            augs.extend(range(V))
        on_images(B)
        batch.clear()

    for sample in samples:
        batch.append(_decode_sample(sample))
        if len(batch) == max(1, cfg.batch_size // len(VIEWS[augment])):
            flush()
    if batch:
        flush()
    return {
        "key": keys,
        "label": np.asarray(labels, dtype=np.int16),
        "aug": np.asarray(augs, dtype=np.uint8),
        "prologue": np.concatenate(prologues),
        "visual": np.concatenate(visuals),
    }


def _list_array(codes: np.ndarray) -> pa.ListArray:
    """[rows, L] uint16 -> a list<uint16> column without a Python loop."""
    rows, length = codes.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * length)
    return pa.ListArray.from_arrays(offsets, pa.array(codes.reshape(-1), type=pa.uint16()))


def _write_parquet(rows: dict, group: int, tmp: str, artifact: Artifact, rel: str) -> tuple[dict, list[int]]:
    z_len, num_visual = rows["prologue"].shape[1], rows["visual"].shape[1]
    table = pa.table(
        {
            "key": pa.array(rows["key"], pa.string()),
            "label": pa.array(rows["label"]),
            "aug": pa.array(rows["aug"]),
            "prologue": _list_array(rows["prologue"]),
            "visual": _list_array(rows["visual"]),
        },
        schema=parquet_schema(z_len, num_visual),
    )
    local = os.path.join(tmp, "rows.parquet")
    pq.write_table(table, local, row_group_size=group, compression="zstd")
    n = len(rows["key"])
    return artifact.put_file(local, rel).__dict__, [min(group, n - i) for i in range(0, n, group)]


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _write_wds(rows: dict, group: int, name: str, tmp: str, artifact: Artifact, rel: str) -> tuple[dict, list[int]]:
    local = os.path.join(tmp, "rows.tar")
    codes = np.concatenate([rows["prologue"], rows["visual"]], axis=1)  # [rows, Z + N]
    n, sizes = len(rows["key"]), []
    # encoded here, with fixed mtimes (tar and gzip): the same rows always give the same bytes
    with wds.TarWriter(local, mtime=0.0, encoder=False) as sink:
        for b, i in enumerate(range(0, n, group)):
            sl = slice(i, i + group)
            keys = json.dumps({"keys": rows["key"][sl]}, separators=(",", ":")).encode()
            sink.write(
                {
                    "__key__": f"{name}-{b:05d}",
                    "codes.npy": _npy(codes[sl]),
                    "cls.npy": _npy(rows["label"][sl]),
                    "aug.npy": _npy(rows["aug"][sl]),
                    "json.gz": gzip.compress(keys, mtime=0),
                }
            )
            sizes.append(len(rows["key"][sl]))
    return artifact.put_file(local, rel).__dict__, sizes


if __name__ == "__main__":
    sys.exit(worker_main(run))
