"""Data assets: raw images sharded into WebDataset tars in the store, and the helpers every asset
uses to turn step results into materialisations (and, for the steps with a worker subprocess, to
launch it through Dagster Pipes and read back what it reported: `WorkerReports`)."""

import base64
import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

from dagster import (
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    PipesSubprocessClient,
    RetryRequested,
    asset,
    observable_source_asset,
)
from dagster._core.errors import DagsterPipesExecutionError  # what a failed Pipes subprocess raises; not public

from assets import checks
from assets.resources import LISTING, ProfileResource, StoreResource, run_plan
from pipelines import sharding
from pipelines.launch import LaunchError
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


WORKER_RETRIES = 2  # reruns of a variant step whose worker process died
RETRY_WAIT_S = 5  # seconds before such a rerun


def per_variant(
    context: AssetExecutionContext, step: Callable[[str], tuple[StepResult | list[StepResult], dict]]
) -> MaterializeResult:
    """Run `step(variant)` for every variant partition of this run (one, or all of them when the
    run covers a partition range: the retrain job does) and attach each result's metadata to its
    own partition's materialisation. A step may return several results (one per sampling run):
    the first one's URI and cache key are shown, all of them make the data version. A step whose
    worker process dies is retried (WORKER_RETRIES): every step resumes from the store."""
    keys = {}
    for variant in context.partition_keys:
        try:
            results, metadata = step(variant)
        except (LaunchError, DagsterPipesExecutionError) as e:
            # a worker died (killed, out of memory, node lost): Dagster reruns the step, which reuses the
            # variants already done and resumes this one from its newest store checkpoint
            context.log.warning(f"{context.asset_key.to_user_string()}[{variant}]: worker failed ({e}); "
                                f"retrying, resuming from the store (attempt {context.retry_number + 1} of "
                                f"{WORKER_RETRIES})")
            raise RetryRequested(max_retries=WORKER_RETRIES, seconds_to_wait=RETRY_WAIT_S) from e
        results = results if isinstance(results, list) else [results]
        metadata = step_metadata(results[0], metadata)
        if len(results) > 1:
            metadata["artefacts"] = MetadataValue.json([r.artifact.uri for r in results])
        context.add_asset_metadata(metadata, partition_key=variant)
        keys[variant] = data_version({str(i): r.artifact.key for i, r in enumerate(results)}).value
    return MaterializeResult(data_version=data_version(keys))


class WorkerReports:
    """The `runner` an asset passes to a step whose worker is a subprocess (tokenizer, export, AR
    training, sampling): it launches the worker through Dagster Pipes, so rank 0's log lines land in
    the run's event log (the workers' raw stdout, torch warnings included, stays in the step's captured
    output), and keeps the report each worker sends, by artefact key. `numbers()` is what an asset
    builds its metadata from: that report when the worker ran in this run, else the stored manifest."""

    def __init__(self, context: AssetExecutionContext, client: PipesSubprocessClient):
        self.context, self.client = context, client
        self.reports: dict[str, dict[str, Any]] = {}

    def __call__(self, argv: list[str], env: dict[str, str]) -> None:
        invocation = self.client.run(command=argv, context=self.context, env=env)
        for message in invocation.get_custom_messages():
            if isinstance(message, dict) and "report" in message:  # pipelines.workers.report()
                self.reports[message["key"]] = message["report"]

    def numbers(self, result: StepResult) -> tuple[dict[str, Any], str]:
        """(fields, `metrics_from`): the report of the worker that made `result`'s artefact in this run
        (`pipes`), keyed like its manifest's fields; else the manifest's own fields (`manifest`: reused)."""
        report = self.reports.get(result.artifact.key)
        if report is not None:
            return report, "pipes"
        return dataclasses.asdict(result.manifest), "manifest"


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
