"""Raw images -> WebDataset tar shards of lossless PNGs in the object store.

Images are taken in the source's stable order and shard `i` holds images `[i*S, (i+1)*S)`, so the
assignment of images to shards is deterministic whatever the number of workers. Workers (forked
processes) each write whole shards to a local temp file, upload them and record the part; a rerun
after a crash skips recorded parts and the manifest is written last.

Standalone: `python -m pipelines.sharding --profile fashion32 [--partition train]`.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipelines.images import encode_png, grid_png
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.profiles import DataConfig
from pipelines.sources import CorruptImage, Item, Source, open_source
from pipelines.store import StepResult, Store

ASSET = "image_shards"
log = logging.getLogger(__name__)


def transform(img: Image.Image, resolution: int, resize: str) -> Image.Image:
    """Bring an image to a `resolution`-square RGB image (grayscale repeated to 3 channels)."""
    w, h = img.size
    if resize == "pad":
        if w > resolution or h > resolution:
            raise ValueError(f"image of {w}x{h} does not fit in {resolution} with resize=pad")
        canvas = Image.new(img.mode, (resolution, resolution))
        canvas.paste(img, ((resolution - w) // 2, (resolution - h) // 2))
        img = canvas
    else:  # center_crop
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != resolution:
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return img.convert("RGB")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


@dataclass
class ShardTask:
    store: Store
    artifact_key: str
    items: list[Item]
    split: str
    index: int
    resolution: int
    resize: str


_worker_source: Source | None = None  # set once per worker by the pool initializer, not per task


def _init_worker(source: Source) -> None:
    global _worker_source
    _worker_source = source


def write_shard(task: ShardTask, source: Source | None = None) -> dict[str, Any]:
    """Write one shard (in a worker process or inline); returns its part record."""
    source = source or _worker_source
    assert source is not None, "write_shard needs a source (pool initializer or argument)"
    artifact = task.store.artifact(ASSET, task.artifact_key)
    name = shard_name(task.split, task.index)
    rel = f"shards/{name}.tar"
    labels: Counter[int] = Counter()
    corrupt = []
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, f"{name}.tar")
        with wds.TarWriter(local, mtime=0.0) as sink:  # fixed mtime: same input -> same shard bytes
            for item in task.items:
                try:
                    img = source.read(item)
                except CorruptImage as e:
                    log.warning("skipping corrupt image %s", e)
                    corrupt.append(item.key)
                    continue
                meta = {"key": item.key, "label": item.label, "class": source.classes[item.label],
                        "split": task.split, "source_size": list(img.size)}
                png = encode_png(transform(img, task.resolution, task.resize))
                sink.write({"__key__": item.key, "png": png, "cls": item.label, "json": meta})
                labels[item.label] += 1
        record = artifact.put_file(local, rel)
    part = {
        "shard": name,
        "files": {rel: record.__dict__},
        "samples": sum(labels.values()),
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "corrupt": corrupt,
    }
    artifact.record_part(name, part)
    return part


def source_for(plan: Plan, split: str) -> Source:
    """The listed source of one split; re-opened (and checked against the listing) when the plan was
    built from a recorded listing."""
    source = plan.listing.sources.get(split)
    if source is None:
        cfg = plan.profile.data.source(split)
        source = open_source(cfg.kind, cfg.url, cfg.split)
        if source.fingerprint() != plan.listing.splits[split].fingerprint:
            raise RuntimeError(f"{ASSET}[{split}]: the source at {cfg.url} changed since it was listed; list it again")
    return source


def shard_split(
    plan: Plan, split: str, *, progress: bool = True, on_log: Callable[[str], None] = log.info
) -> StepResult:
    """Shard one split of the plan's listed source into the store; returns at once if already done."""
    target = plan.shards(split)
    return cached_or_run(target, lambda: _shard(plan, target, split, progress, on_log), on_log)


def _shard(plan: Plan, target: Target, split: str, progress: bool, on_log: Callable[[str], None]) -> dict:
    data, artifact = plan.profile.data, target.artifact
    source = source_for(plan, split)
    items = source.items()
    if data.source(split).limit:
        items = items[: data.source(split).limit]
    n_shards = (len(items) + data.shard_size - 1) // data.shard_size
    names = [shard_name(split, i) for i in range(n_shards)]
    done = {k: v for k, v in artifact.parts().items() if k in names}
    if done:
        on_log(f"resuming {target.label}: {len(done)}/{n_shards} shards already written at {artifact.uri}")
    tasks = [
        ShardTask(plan.store, target.key, items[i * data.shard_size : (i + 1) * data.shard_size],
                  split, i, data.resolution, data.resize)
        for i, name in enumerate(names)
        if name not in done
    ]
    on_log(f"sharding {len(items)} {split} images into {n_shards} shards with {data.workers} workers")
    bar = tqdm(total=len(items), initial=sum(p["samples"] + len(p["corrupt"]) for p in done.values()),
               unit="img", desc=target.label, disable=not progress, file=sys.stderr)
    for part in _run(tasks, source, data.workers):
        done[part["shard"]] = part
        bar.update(part["samples"] + len(part["corrupt"]))
    bar.close()
    parts = [done[n] for n in names]
    files = {rel: rec for p in parts for rel, rec in p["files"].items()}
    files["classes.json"] = artifact.put_bytes("classes.json", json.dumps(source.classes, indent=1).encode())
    preview = _preview(source, items, data)
    if preview:
        files["preview.png"] = artifact.put_bytes("preview.png", preview)
    labels: Counter[str] = Counter()
    for p in parts:
        labels.update(p["labels"])
    corrupt = [k for p in parts for k in p["corrupt"]]
    if corrupt:
        on_log(f"skipped {len(corrupt)} corrupt images, e.g. {corrupt[:5]}")
    listed = plan.listing.splits[split]
    return artifact.commit(
        files,
        profile=plan.label,
        config=target.config,
        lineage={"raw_images": {"kind": listed.kind, "url": listed.url, "split": listed.split,
                                "fingerprint": listed.fingerprint}},
        code_version=CODE_VERSIONS[ASSET],
        shards=[rel for p in parts for rel in p["files"]],
        counts={
            "samples": sum(p["samples"] for p in parts),
            "corrupt": len(corrupt),
            "shards": len(parts),
            "source_items": len(items),
            "per_class": {source.classes[int(k)]: v for k, v in sorted(labels.items(), key=lambda kv: int(kv[0]))},
        },
        corrupt_keys=corrupt,
        classes=source.classes,
    )


def _run(tasks: list[ShardTask], source: Source, workers: int):
    if workers == 1 or len(tasks) <= 1:
        for t in tasks:
            yield write_shard(t, source)
        return
    # fork: workers inherit the opened source (decoded IDX arrays, archive indexes) instead of
    # re-importing and re-reading it (spawn was slower than one process here). fsspec resets its
    # instance cache and event loop in the child; stores and sources rebuild per-process handles.
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                             initializer=_init_worker, initargs=(source,)) as pool:
        for fut in as_completed([pool.submit(write_shard, t) for t in tasks]):
            yield fut.result()


def _preview(source: Source, items: list[Item], data: DataConfig) -> bytes:
    images = []
    for item in items:
        if len(images) >= data.preview:
            break
        try:
            images.append(transform(source.read(item), data.resolution, data.resize))
        except CorruptImage:
            continue
    return grid_png(images)


def main(argv: list[str] | None = None) -> int:
    from pipelines.runner import step_main

    return step_main(__doc__, argv, ASSET)


if __name__ == "__main__":
    sys.exit(main())
