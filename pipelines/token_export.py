"""Stage 2: encode every image once with the frozen tokenizer into a pre-tokenised dataset.

`export_tokens()` (what the asset calls) takes the plan's tokenizer and image shards, runs a reconstruction sanity check
(decoding the uint16 codes of a few val images must give exactly the tokenizer's reconstruction, and
their PSNR must match the tokenizer's own figure), then launches the `worker` subcommand on
`tokens.processes` ranks; each rank encodes every processes-th image shard (train with the
configured augmentation, val centre only) and writes, per image shard, the same rows twice:

    parquet/<split>-NNNNNN.parquet   columns key, label, aug, prologue, visual (row groups of
                                     `rows_per_group` rows, zstd)
    wds/<split>-NNNNNN.tar           WebDataset samples, one per block of `rows_per_group` rows:
                                     <block>.codes.npy uint16 [R, Z + N] (prologue then visual),
                                     <block>.cls.npy int16 [R], <block>.aug.npy uint8 [R],
                                     <block>.json.gz {"keys": [...]} (gzip: keys are
                                     the largest overhead after the codes)

Rows are blocked in the WebDataset format because a tar member costs ≥ 1 KiB of header and padding,
more than the ~140 bytes of codes of one fashion32 row. Finished shards are recorded as parts, so a
killed export resumes; the manifest (row counts, row groups, checksums, bytes per token, the
tokenizer's cache key, codebook sizes) is written last.

Standalone: `python -m pipelines.token_export --profile fashion32 --variant prologue`.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image

from modeling.config import from_dict, to_dict
from pipelines.images import grid_png
from pipelines.launch import launch, worker_context
from pipelines.loaders import load_tokenizer
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.profiles import SPLITS, TokenExportConfig
from pipelines.runner import step_main, worker_args, worker_env
from pipelines.shard_reader import image_dataset, image_loader
from pipelines.sharding import shard_name
from pipelines.store import Artifact, StepResult, Store

ASSET = "token_dataset"
FORMATS = ("parquet", "wds")
log = logging.getLogger(__name__)

# Names of the views each augmentation writes, in `aug` order (the row's `aug` is an index here).
TEN_CROPS = ["top_left", "top_right", "bottom_left", "bottom_right", "center"]
VIEWS = {
    "none": ["original"],
    "flip": ["original", "flip"],
    "tencrop_flip": TEN_CROPS + [f"mirror_{c}" for c in TEN_CROPS],  # crops of the mirrored image
}


class SanityCheckFailed(RuntimeError):
    """Decoding stored codes does not give back the tokenizer's reconstructions."""


def parquet_schema(z_len: int, num_visual: int) -> pa.Schema:
    """The Parquet schema (also what the README documents)."""
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),  # the image's key in image_shards
            pa.field("label", pa.int16(), nullable=False),
            pa.field("aug", pa.uint8(), nullable=False),  # index into the manifest's `views`
            pa.field("prologue", pa.list_(pa.uint16()), nullable=False),  # z_len codes (empty: baseline)
            pa.field("visual", pa.list_(pa.uint16()), nullable=False),  # num_visual codes, raster order
        ],
        metadata={"z_len": str(z_len), "num_visual": str(num_visual)},
    )


def views(images: torch.Tensor, augment: str, crop_scale: float) -> torch.Tensor:
    """uint8 [B, C, H, W] -> [V, B, C, H, W], the views of VIEWS[augment] in order."""
    from torchvision.transforms.v2 import functional as TF

    if augment == "none":
        return images[None]
    if augment == "flip":
        return torch.stack([images, TF.horizontal_flip(images)])
    side = images.shape[-1]
    big = TF.resize(images, [round(side * crop_scale)] * 2, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    crops = TF.ten_crop(big, [side, side])  # tl, tr, bl, br, centre, then the same of the mirror
    return torch.stack(list(crops))


@torch.no_grad()
def encode(tokenizer, images: torch.Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [B, C, H, W] -> prologue codes [B, Z] and visual codes [B, N], both uint16."""
    enc = tokenizer.encode(images.to(device).float().div(127.5).sub(1))
    visual = enc.visual.codes.cpu().numpy().astype(np.uint16)
    prologue = enc.prologue.codes.cpu().numpy() if enc.prologue is not None else np.zeros((len(images), 0))
    return prologue.astype(np.uint16), visual


# -- the parent: sanity check, launch, commit -------------------------------------------------------
def export_tokens(
    plan: Plan, variant: str, *, on_log: Callable[[str], None] = log.info, progress: bool = True
) -> StepResult:
    """Export (or find) the pre-tokenised dataset of one variant from its plan tokenizer and image
    shards; returns once its manifest exists."""
    target = plan.tokens(variant)
    return cached_or_run(target, lambda: _export(plan, target, variant, progress, on_log), on_log)


def _export(plan: Plan, target: Target, variant: str, progress: bool, on_log: Callable[[str], None]) -> dict:
    tok = plan.tokenizer(variant)
    tok_manifest = tok.require()
    shards = {s: plan.shards(s) for s in SPLITS}
    shard_manifests = {s: t.require() for s, t in shards.items()}
    cfg, artifact = plan.profile.tokens, target.artifact
    sanity, grid = sanity_check(tok.artifact, tok_manifest, shards["val"].artifact, cfg)
    on_log(
        f"sanity check: stored codes decode to the tokenizer's reconstructions; PSNR {sanity['psnr_db']:.2f} dB "
        f"on {sanity['images']} val images (tokenizer: {sanity['tokenizer_psnr_db']:.2f} dB)"
    )
    shard_keys = {s: t.key for s, t in shards.items()}
    spec = {"variant": variant, "tokens": to_dict(cfg), "tokenizer": tok.key, "shards": shard_keys}
    records = {
        "spec.json": artifact.put_json("spec.json", spec).__dict__,
        "sanity.png": artifact.put_bytes("sanity.png", grid_png(grid)).__dict__,
    }
    launch("pipelines.token_export", worker_args(plan.store, artifact.key, progress), cfg.processes,
           on_line=on_log, env=worker_env(plan.store))
    parts = artifact.parts()
    tasks = _tasks(shard_manifests)
    missing = [name for name, _, _ in tasks if name not in parts]
    if missing:
        raise RuntimeError(f"{artifact.uri}: the export subprocess exited without {', '.join(missing)}")
    codes = plan.codes(variant)
    layout: dict[str, dict[str, list]] = {f: {s: [] for s in SPLITS} for f in FORMATS}
    counts: dict[str, Any] = {"rows": {s: 0 for s in SPLITS}, "images": {s: 0 for s in SPLITS}}
    for name, split, _ in tasks:
        part = parts[name]
        records.update(part["files"])
        counts["rows"][split] += part["rows"]
        counts["images"][split] += part["images"]
        for fmt in FORMATS:
            layout[fmt][split].append({"file": part[fmt]["file"], "rows": part["rows"], "units": part[fmt]["units"]})
    tokens = sum(counts["rows"].values()) * (codes["z_len"] + codes["num_visual"])
    counts["tokens"] = tokens
    counts["bytes_per_token"] = {
        fmt: round(sum(records[f["file"]]["size"] for s in SPLITS for f in layout[fmt][s]) / tokens, 4)
        for fmt in FORMATS
    }
    return artifact.commit(
        records,
        profile=plan.label,
        config=target.config,
        lineage=target.inputs,
        code_version=CODE_VERSIONS[ASSET],
        counts=counts,
        layout=layout,
        views=VIEWS[cfg.augment],
        codes=codes,
        classes=shard_manifests["train"]["classes"],
        sanity=sanity,
    )


def _tasks(shard_manifests: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(part name, split, image shard path) for every image shard of both splits."""
    return [(shard_name(s, i), s, rel) for s in SPLITS for i, rel in enumerate(shard_manifests[s]["shards"])]


@torch.no_grad()
def sanity_check(tok_artifact: Artifact, tok_manifest: dict, val: Artifact, cfg: TokenExportConfig):
    """Decode the uint16 codes of the first val images; they must equal the tokenizer's reconstruction
    bit for bit and their PSNR must be within tolerance of the tokenizer's recorded val PSNR."""
    from modeling.tokenizer_eval import psnr

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(tok_artifact, device)
    psnrs, grid = [], []
    for images, _ in image_loader(val, min(cfg.batch_size, cfg.sanity_images), num_workers=0, rank=0, world_size=1):
        images = images[: cfg.sanity_images - sum(len(p) for p in psnrs)]
        x = images.to(device).float().div(127.5).sub(1)
        reference, _ = tokenizer(x)
        _, visual = encode(tokenizer, images, device)
        decoded = tokenizer.decode_codes(torch.from_numpy(visual.astype(np.int64)).to(device))
        if not torch.equal(decoded, reference):
            diff = (decoded - reference).abs().max().item()
            raise SanityCheckFailed(
                f"decoding the stored uint16 codes differs from the tokenizer's reconstruction "
                f"(max |diff| {diff:.3g}); tokenizer {tok_artifact.uri}"
            )
        psnrs.append(psnr(decoded, x).cpu())
        if not grid:
            grid = [images[:8], ((decoded[:8].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()]
        if sum(len(p) for p in psnrs) >= cfg.sanity_images:
            break
    measured, recorded = float(torch.cat(psnrs).mean()), tok_manifest["metrics"]["psnr_db"]
    if abs(measured - recorded) > cfg.sanity_tolerance_db:
        raise SanityCheckFailed(
            f"PSNR of decoded codes {measured:.2f} dB on {sum(map(len, psnrs))} val images differs from the "
            f"tokenizer's {recorded:.2f} dB by more than tokens.sanity_tolerance_db={cfg.sanity_tolerance_db}; "
            f"tokenizer {tok_artifact.uri}"
        )
    result = {"images": sum(map(len, psnrs)), "psnr_db": round(measured, 4), "tokenizer_psnr_db": recorded}
    return result, torch.cat(grid)


# -- worker (one per rank) -------------------------------------------------------------------------
def worker(store: Store, key: str, progress: bool) -> None:
    from tqdm import tqdm

    ctx = worker_context()
    rank, world, device = ctx.rank, ctx.world, ctx.device
    artifact = store.artifact(ASSET, key)
    spec = artifact.read_json("spec.json")
    cfg = from_dict(TokenExportConfig, spec["tokens"])
    tokenizer = load_tokenizer(store.artifact("tokenizer", spec["tokenizer"]), device)
    shards = {s: store.artifact("image_shards", k) for s, k in spec["shards"].items()}
    manifests = {s: a.manifest() for s, a in shards.items()}
    done = artifact.parts()
    mine = [t for t in _tasks(manifests)[rank::world] if t[0] not in done]
    total = sum(_shard_images(manifests[s], rel) for _, s, rel in mine)
    bar = tqdm(total=total, unit="img", disable=not (progress and rank == 0 and sys.stderr.isatty()))
    for name, split, rel in mine:
        t0 = time.perf_counter()
        augment = cfg.augment if split == "train" else "none"
        part = write_shard(
            artifact, name, shards[split], manifests[split], rel, tokenizer, device, cfg, augment, on_images=bar.update
        )
        rate = part["images"] / (time.perf_counter() - t0)
        print(f"rank {rank}: {name}: {part['images']} images -> {part['rows']} rows ({rate:.0f} img/s)", flush=True)
    bar.close()


def _shard_images(manifest: dict, rel: str) -> int:
    """Images in one shard, from the shard size and the split's total (only the last is short)."""
    size, total = manifest["config"]["shard_size"], manifest["counts"]["samples"]
    return min(size, total - manifest["shards"].index(rel) * size)


def _decode_sample(sample: dict) -> tuple[str, torch.Tensor, int]:
    rgb = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    return sample["__key__"], torch.from_numpy(rgb.copy()).permute(2, 0, 1), int(sample["cls"])


def write_shard(
    artifact: Artifact,
    name: str,
    shards: Artifact,
    manifest: dict,
    rel: str,
    tokenizer,
    device: torch.device,
    cfg: TokenExportConfig,
    augment: str,
    on_images=lambda n: None,
) -> dict:
    """Encode one image shard into one Parquet file and one WebDataset tar; record the part."""
    samples = image_dataset(shards, manifest, rank=0, world_size=1, decode=False, shards=[rel])
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
    rows = {
        "key": keys,
        "label": np.asarray(labels, dtype=np.int16),
        "aug": np.asarray(augs, dtype=np.uint8),
        "prologue": np.concatenate(prologues),
        "visual": np.concatenate(visuals),
    }
    n = len(keys)
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


def main(argv: list[str] | None = None) -> int:
    return step_main(
        __doc__,
        argv,
        ASSET,
        worker=worker,
        summary=lambda m: (
            f"{m['counts']['rows']['train']} train / {m['counts']['rows']['val']} val rows, "
            f"bytes per token {m['counts']['bytes_per_token']}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
