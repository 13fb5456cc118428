"""Stage 2: encode every image once with the frozen tokenizer into a pre-tokenised dataset.

`export_tokens()` (what the asset calls) takes the plan's tokenizer and image shards, runs a reconstruction sanity check
(decoding the uint16 codes of a few val images must give exactly the tokenizer's reconstruction, and
their PSNR must match the tokenizer's own figure), then launches its worker (`pipelines.workers.export`) on
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

import logging
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from modeling.config import to_dict
from pipelines.images import grid_png
from pipelines.launch import Runner, launch_worker
from pipelines.loaders import load_tokenizer
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.profiles import SPLITS, TokenExportConfig
from pipelines.runner import step_main
from pipelines.shard_reader import image_loader
from pipelines.sharding import shard_name
from pipelines.store import Artifact, StepResult

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
    plan: Plan,
    variant: str,
    *,
    on_log: Callable[[str], None] = log.info,
    progress: bool = True,
    runner: Runner | None = None,
) -> StepResult:
    """Export (or find) the pre-tokenised dataset of one variant from its plan tokenizer and image
    shards; returns once its manifest exists."""
    target = plan.tokens(variant)
    return cached_or_run(target, lambda: _export(plan, target, variant, progress, on_log, runner), on_log)


def _export(plan: Plan, target: Target, variant: str, progress: bool, on_log, runner: Runner | None) -> dict:
    tok = plan.tokenizer(variant)
    tok_manifest = tok.require()
    shards = {s: plan.shards(s) for s in SPLITS}
    shard_manifests = {s: t.require() for s, t in shards.items()}
    cfg, artifact, codes = plan.profile.tokens, target.artifact, plan.codes(variant)
    sanity, grid = sanity_check(tok.artifact, tok_manifest.metrics["psnr_db"], shards["val"].artifact, cfg)
    on_log(
        f"sanity check: stored codes decode to the tokenizer's reconstructions; PSNR {sanity['psnr_db']:.2f} dB "
        f"on {sanity['images']} val images (tokenizer: {sanity['tokenizer_psnr_db']:.2f} dB)"
    )
    shard_keys = {s: t.key for s, t in shards.items()}
    spec = {"variant": target.config["variant"], "tokens": to_dict(cfg), "tokenizer": tok.key, "shards": shard_keys,
            "codes": codes}  # fmt: skip
    records = {
        "spec.json": artifact.put_json("spec.json", spec).__dict__,
        "sanity.png": artifact.put_bytes("sanity.png", grid_png(grid)).__dict__,
    }
    launch_worker("export", plan.store, artifact.key, cfg.processes, progress, on_log, runner=runner)
    parts = artifact.parts()
    todo = tasks({s: m.shards for s, m in shard_manifests.items()})
    missing = [name for name, _, _ in todo if name not in parts]
    if missing:
        raise RuntimeError(f"{artifact.uri}: the export subprocess exited without {', '.join(missing)}")
    files, layout, counts = summarise(parts, todo, codes)
    return artifact.commit(
        {**records, **files},
        profile=plan.label,
        config=target.config,
        lineage=target.inputs,
        code_version=CODE_VERSIONS[ASSET],
        counts=counts,
        layout=layout,
        views=VIEWS[cfg.augment],
        codes=codes,
        classes=shard_manifests["train"].classes,
        sanity=sanity,
    )


def summarise(parts: dict[str, dict], todo: list[tuple[str, str, str]], codes: dict) -> tuple[dict, dict, dict]:
    """(files, layout, counts) of an export whose every task has its part: what the parent commits and
    what the worker reports (rows and images per split, tokens, bytes per token of each format)."""
    files: dict[str, dict] = {}
    layout: dict[str, dict[str, list]] = {f: {s: [] for s in SPLITS} for f in FORMATS}
    counts: dict[str, Any] = {"rows": {s: 0 for s in SPLITS}, "images": {s: 0 for s in SPLITS}}
    for name, split, _ in todo:
        part = parts[name]
        files.update(part["files"])
        counts["rows"][split] += part["rows"]
        counts["images"][split] += part["images"]
        for fmt in FORMATS:
            layout[fmt][split].append({"file": part[fmt]["file"], "rows": part["rows"], "units": part[fmt]["units"]})
    tokens = sum(counts["rows"].values()) * (codes["z_len"] + codes["num_visual"])
    counts["tokens"] = tokens
    counts["bytes_per_token"] = {
        fmt: round(sum(files[f["file"]]["size"] for s in SPLITS for f in layout[fmt][s]) / tokens, 4)
        for fmt in FORMATS
    }
    return files, layout, counts


def tasks(shards: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """(part name, split, image shard path) for every image shard of both splits."""
    return [(shard_name(s, i), s, rel) for s in SPLITS for i, rel in enumerate(shards[s])]


@torch.no_grad()
def sanity_check(tok_artifact: Artifact, recorded: float, val: Artifact, cfg: TokenExportConfig):
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
    measured = float(torch.cat(psnrs).mean())
    if abs(measured - recorded) > cfg.sanity_tolerance_db:
        raise SanityCheckFailed(
            f"PSNR of decoded codes {measured:.2f} dB on {sum(map(len, psnrs))} val images differs from the "
            f"tokenizer's {recorded:.2f} dB by more than tokens.sanity_tolerance_db={cfg.sanity_tolerance_db}; "
            f"tokenizer {tok_artifact.uri}"
        )
    result = {"images": sum(map(len, psnrs)), "psnr_db": round(measured, 4), "tokenizer_psnr_db": recorded}
    return result, torch.cat(grid)


def main(argv: list[str] | None = None) -> int:
    return step_main(
        __doc__,
        argv,
        ASSET,
        summary=lambda m: (
            f"{m.counts['rows']['train']} train / {m.counts['rows']['val']} val rows, "
            f"bytes per token {m.counts['bytes_per_token']}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
