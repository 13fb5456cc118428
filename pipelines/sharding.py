"""Raw images -> WebDataset tar shards of lossless PNGs in the object store.

Images are taken in the source's stable order and shard `i` holds images `[i*S, (i+1)*S)`, so the
assignment of images to shards is deterministic whatever the number of workers. Workers (forked
processes) each write whole shards to a local temp file, upload them and record the part; a rerun
after a crash skips recorded parts and the manifest is written last.

Standalone: `python -m pipelines.sharding --profile fashion32 --split train`.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipelines.config import to_dict
from pipelines.images import encode_png, grid_png
from pipelines.profiles import SPLITS, DataConfig, Profile, load_profile
from pipelines.sources import CorruptImage, Item, Source, open_source
from pipelines.store import Artifact, Store, cache_key

ASSET = "image_shards"
CODE_VERSION = "1"  # bump whenever the bytes written for the same config would change
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


@dataclass
class ShardResult:
    artifact: Artifact
    manifest: dict[str, Any]
    cached: bool
    seconds: float

    @property
    def shard_urls(self) -> list[str]:
        return [self.artifact.file_uri(rel) for rel in self.manifest["shards"]]


def split_config(data: DataConfig, split: str) -> dict[str, Any]:
    """The part of the profile that decides the bytes of this split's shards (not `workers`)."""
    return {
        "split": split,
        "source": to_dict(data.source(split)),
        "resolution": data.resolution,
        "resize": data.resize,
        "shard_size": data.shard_size,
        "preview": data.preview,
    }


def shards_key(data: DataConfig, split: str, fingerprint: str) -> str:
    """Cache key of a split's shards: this asset's config plus the listing fingerprint of its source."""
    return cache_key(ASSET, CODE_VERSION, split_config(data, split), {"raw_images": fingerprint})


def listing_keys(profile: Profile) -> dict[str, str]:
    """The shards' cache key of every split for the source as listed right now. A new, removed or
    changed image changes it, so it names one arrival of data (the new-data sensor's run key)."""
    keys = {}
    for split in SPLITS:
        cfg = profile.data.source(split)
        keys[split] = shards_key(profile.data, split, open_source(cfg.kind, cfg.url, cfg.split).fingerprint())
    return keys


def shard_split(
    profile: Profile,
    split: str,
    store: Store,
    *,
    progress: bool = True,
    on_log: Callable[[str], None] = log.info,
) -> ShardResult:
    """Shard one split of the profile's source into the store; returns at once if already done."""
    start = time.perf_counter()
    data = profile.data
    src_cfg = data.source(split)
    source = open_source(src_cfg.kind, src_cfg.url, src_cfg.split)
    items = source.items()
    if src_cfg.limit:
        items = items[: src_cfg.limit]
    config = split_config(data, split)
    fingerprint = source.fingerprint()
    key = shards_key(data, split, fingerprint)
    artifact = store.artifact(ASSET, key)
    manifest = artifact.manifest()
    if manifest is not None:
        on_log(f"{ASSET}[{split}] already materialised at {artifact.uri}")
        return ShardResult(artifact, manifest, cached=True, seconds=time.perf_counter() - start)

    n_shards = (len(items) + data.shard_size - 1) // data.shard_size
    names = [shard_name(split, i) for i in range(n_shards)]
    done = {k: v for k, v in artifact.parts().items() if k in names}
    if done:
        on_log(f"resuming {ASSET}[{split}]: {len(done)}/{n_shards} shards already written at {artifact.uri}")
    tasks = [
        ShardTask(store, key, items[i * data.shard_size : (i + 1) * data.shard_size],
                  split, i, data.resolution, data.resize)
        for i, name in enumerate(names)
        if name not in done
    ]
    on_log(f"sharding {len(items)} {split} images into {n_shards} shards with {data.workers} workers")
    bar = tqdm(total=len(items), initial=sum(p["samples"] + len(p["corrupt"]) for p in done.values()),
               unit="img", desc=f"{ASSET}[{split}]", disable=not progress, file=sys.stderr)
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
    manifest = artifact.commit(
        files,
        profile=f"{profile.name}@{profile.version}",
        config=config,
        lineage={"raw_images": {"kind": src_cfg.kind, "url": src_cfg.url, "split": src_cfg.split,
                                "fingerprint": fingerprint}},
        code_version=CODE_VERSION,
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
    return ShardResult(artifact, manifest, cached=False, seconds=time.perf_counter() - start)


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("PROLOGUE_PROFILE", "fashion32"))
    parser.add_argument("--split", choices=["train", "val"], action="append",
                        help="split(s) to shard (default: both)")
    parser.add_argument("--store", default=None, help="store URL (default: $PROLOGUE_STORE or ./store)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a profile field, e.g. --set data.workers=4")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    profile = load_profile(args.profile, args.overrides)
    store = Store(args.store)
    for split in args.split or ["train", "val"]:
        r = shard_split(profile, split, store, progress=not args.no_progress, on_log=log.info)
        c = r.manifest["counts"]
        print(f"{split}: {c['samples']} images in {c['shards']} shards, {c['corrupt']} corrupt, "
              f"{'cached' if r.cached else f'{r.seconds:.1f}s'} -> {r.artifact.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
