"""Data assets: raw images sharded into WebDataset tars in the store."""

import base64
import hashlib
import json

from dagster import (
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    StaticPartitionsDefinition,
    asset,
    observable_source_asset,
)

from assets.resources import ProfileResource, StoreResource
from pipelines import sharding
from pipelines.profiles import SPLITS
from pipelines.sources import open_source

split_partitions = StaticPartitionsDefinition(["train", "val"])


def materialized(result, metadata: dict) -> MaterializeResult:
    """The MaterializeResult of a step result (artifact, manifest, cached, seconds): the metadata
    every asset shows (store URI, cache key, profile, reuse, time) plus `metadata`; the cache key is
    the data version."""
    art = result.artifact
    common = {
        "uri": MetadataValue.path(art.uri),
        "cache_key": art.key,
        "profile": result.manifest["profile"],
        "reused_existing": result.cached,
        "seconds": round(result.seconds, 2),
    }
    return MaterializeResult(metadata={**common, **metadata}, data_version=DataVersion(art.key))


def png_markdown(png: bytes, alt: str) -> MetadataValue:
    """An image the Dagster UI shows inline in the asset's metadata."""
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


@observable_source_asset(group_name="data", description="The raw image source of the profile (listing fingerprint).")
def raw_images(profile: ProfileResource) -> ObserveResult:
    data = profile.profile().data
    metadata, fingerprints = {}, {}
    for split in SPLITS:
        cfg = data.source(split)
        source = open_source(cfg.kind, cfg.url, cfg.split)
        fingerprints[split] = source.fingerprint()
        metadata[f"{split}_url"] = cfg.url
        metadata[f"{split}_images"] = len(source.items())
    version = hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:24]
    return ObserveResult(data_version=DataVersion(version), metadata=metadata)


@asset(
    deps=[raw_images],
    partitions_def=split_partitions,
    code_version=sharding.CODE_VERSION,
    group_name="data",
    kinds={"webdataset", "pillow"},
    description="Raw images -> centre-cropped (or padded) lossless PNGs in WebDataset tar shards.",
)
def image_shards(context: AssetExecutionContext, store: StoreResource, profile: ProfileResource) -> MaterializeResult:
    split = context.partition_key
    result = sharding.shard_split(profile.profile(), split, store.store(), on_log=context.log.info)
    m, art = result.manifest, result.artifact
    counts = m["counts"]
    metadata = {
        "samples": counts["samples"],
        "corrupt_skipped": counts["corrupt"],
        "shards": counts["shards"],
        "per_class": MetadataValue.json(counts["per_class"]),
        "bytes": sum(f["size"] for f in m["files"].values()),
    }
    if "preview.png" in m["files"]:
        metadata["preview"] = png_markdown(art.read_bytes("preview.png"), f"{split} preview")
    return materialized(result, metadata)
