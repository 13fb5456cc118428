"""Data assets: raw images sharded into WebDataset tars in the store, and the helpers every asset
uses to turn step results into materialisations."""

import base64
import hashlib
import json
from collections.abc import Callable

from dagster import (
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    asset,
    observable_source_asset,
)

from assets import checks
from assets.resources import LISTING, ProfileResource, StoreResource, run_plan
from pipelines import sharding
from pipelines.plan import CODE_VERSIONS, list_source
from pipelines.profiles import SPLITS
from pipelines.store import StepResult


def step_metadata(result: StepResult, metadata: dict) -> dict:
    """The metadata every asset shows for a step result (store URI, cache key, profile, reuse,
    time) plus `metadata`."""
    art = result.artifact
    return {
        "uri": MetadataValue.path(art.uri),
        "cache_key": art.key,
        "profile": getattr(result.manifest, "profile", ""),
        "reused_existing": result.cached,
        "seconds": round(result.seconds, 2),
        **metadata,
    }


def data_version(keys: dict[str, str]) -> DataVersion:
    """The data version of one or more artefacts: the cache key itself for one, a hash of the
    (name, key) pairs for several, so it changes exactly when some content does."""
    if len(keys) == 1:
        return DataVersion(next(iter(keys.values())))
    return DataVersion(hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:24])


def materialized(result: StepResult, metadata: dict) -> MaterializeResult:
    """The MaterializeResult of one step result; its cache key is the data version."""
    metadata = step_metadata(result, metadata)
    return MaterializeResult(metadata=metadata, data_version=data_version({"": result.artifact.key}))


def per_variant(
    context: AssetExecutionContext, step: Callable[[str], tuple[StepResult | list[StepResult], dict]]
) -> MaterializeResult:
    """Run `step(variant)` for every variant partition of this run (one, or all of them when the
    run covers a partition range: the retrain job does) and attach each result's metadata to its
    own partition's materialisation. A step may return several results (one per sampling run):
    the first one's URI and cache key are shown, all of them make the data version."""
    keys = {}
    for variant in context.partition_keys:
        results, metadata = step(variant)
        results = results if isinstance(results, list) else [results]
        metadata = step_metadata(results[0], metadata)
        if len(results) > 1:
            metadata["artefacts"] = MetadataValue.json([r.artifact.uri for r in results])
        context.add_asset_metadata(metadata, partition_key=variant)
        keys[variant] = data_version({str(i): r.artifact.key for i, r in enumerate(results)}).value
    return MaterializeResult(data_version=data_version(keys))


INLINE_LIMIT = 1 << 20  # bytes: larger PNGs are linked, never inlined into an event-log row


def png_markdown(artifact, rel: str, alt: str) -> MetadataValue:
    """A stored PNG of `artifact` as asset metadata: inline (the UI shows it) up to INLINE_LIMIT bytes,
    else a link to the file in the store."""
    png = artifact.read_bytes(rel)
    if len(png) > INLINE_LIMIT:
        return MetadataValue.md(f"[{alt}]({artifact.file_uri(rel)}) ({len(png) / 1e6:.1f} MB: stored, not inlined)")
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


@observable_source_asset(group_name="data", description="The raw image source of the profile (listing fingerprint).")
def raw_images(profile: ProfileResource) -> ObserveResult:
    listing = list_source(profile.profile().data)
    metadata = {}
    for split in SPLITS:
        metadata[f"{split}_url"] = listing.splits[split].url
        metadata[f"{split}_images"] = len(listing.sources[split].items())
    fingerprints = {s: v.fingerprint for s, v in listing.splits.items()}
    version = hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()[:24]
    return ObserveResult(data_version=DataVersion(version), metadata=metadata)


@asset(
    deps=[raw_images],
    code_version=CODE_VERSIONS["image_shards"],
    group_name="data",
    kinds={"webdataset", "pillow"},
    check_specs=[
        checks.spec("shards_intact", "image_shards", "every split: shard and sample counts, sha256 of every file")
    ],
    description="Raw images of both splits -> centre-cropped (or padded) lossless PNGs in WebDataset tar shards, "
    "one store artefact per split.",
)
def image_shards(context: AssetExecutionContext, store: StoreResource, profile: ProfileResource):
    plan = run_plan(context.instance, profile, store, relist=True)  # the run's one listing of the source
    metadata = {"profile": plan.label, LISTING: MetadataValue.json(plan.listing.to_dict())}
    keys, problems = {}, {}
    for split in SPLITS:
        result = sharding.shard_split(plan, split, on_log=context.log.info, progress=False)
        m, art = result.manifest, result.artifact
        counts = m.counts
        metadata |= {
            f"{split}_uri": MetadataValue.path(art.uri),
            f"{split}_cache_key": art.key,
            f"{split}_samples": counts.samples,
            f"{split}_corrupt_skipped": counts.corrupt,
            f"{split}_shards": counts.shards,
            f"{split}_bytes": sum(f.size for f in m.files.values()),
            f"{split}_reused_existing": result.cached,
            f"{split}_seconds": round(result.seconds, 2),
            f"{split}_per_class": MetadataValue.json(counts.per_class),
        }
        if "preview.png" in m.files:
            metadata[f"{split}_preview"] = png_markdown(art, "preview.png", f"{split} preview")
        keys[split] = art.key
        problems[split] = checks.shard_problems(art, full=not result.cached)  # reused: sizes only
    yield MaterializeResult(metadata=metadata, data_version=data_version(keys))
    yield checks.check_result("shards_intact", problems)
