"""Data assets: raw images sharded into WebDataset tars in the store."""

import base64

from dagster import (
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    asset,
)

from assets.resources import ProfileResource, StoreResource
from pipelines import sharding

split_partitions = StaticPartitionsDefinition(["train", "val"])


def png_markdown(png: bytes, alt: str) -> MetadataValue:
    """An image the Dagster UI shows inline in the asset's metadata."""
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


@asset(
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
        "uri": MetadataValue.path(art.uri),
        "cache_key": art.key,
        "profile": m["profile"],
        "samples": counts["samples"],
        "corrupt_skipped": counts["corrupt"],
        "shards": counts["shards"],
        "per_class": MetadataValue.json(counts["per_class"]),
        "bytes": sum(f["size"] for f in m["files"].values()),
        "reused_existing": result.cached,
        "seconds": round(result.seconds, 2),
    }
    if "preview.png" in m["files"]:
        metadata["preview"] = png_markdown(art.read_bytes("preview.png"), f"{split} preview")
    return MaterializeResult(metadata=metadata, data_version=DataVersion(art.key))
