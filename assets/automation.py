"""Automation: the whole-graph `retrain` job, its schedule, the new-data sensor, the `evaluation`
job and a run-failure sensor that logs what broke.

The retrain job covers every asset and every variant in one run (the variant assets have a
single-run backfill policy and loop over the run's partition range), so one arrival of data is
one run: it re-shards, retrains both tokenizers and AR models, and re-evaluates. Steps whose
content-derived cache key already exists in the store return at once, so a run with nothing new
costs seconds.
"""

from __future__ import annotations

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SkipReason,
    define_asset_job,
    run_failure_sensor,
    sensor,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from assets.data import data_version, image_shards
from assets.evaluation import GROUP
from assets.integrity import ON_DEMAND_CHECKS
from assets.resources import ProfileResource, StoreResource, default_profile, variant_partitions
from pipelines.plan import Plan
from pipelines.profiles import SPLITS

# every variant partition in one run
_variants = variant_partitions.get_partition_keys()
ALL_VARIANTS = {ASSET_PARTITION_RANGE_START_TAG: _variants[0], ASSET_PARTITION_RANGE_END_TAG: _variants[-1]}
# runs that take the machine's GPUs; deploy/dagster.yaml queues them one at a time
GPU = {"prologue/gpu": "true"}
LISTING_TAG = "prologue/listing"

retrain_job = define_asset_job(
    "retrain",
    selection=AssetSelection.assets(image_shards).downstream() - ON_DEMAND_CHECKS,
    tags={**ALL_VARIANTS, **GPU},
    description="The whole graph for every variant in one run: shards, tokenizers, token datasets, AR models, "
    "evaluation, results table. Unchanged steps are reused from the store.",
)
evaluation_job = define_asset_job(
    "evaluation",
    selection=AssetSelection.groups(GROUP) - ON_DEMAND_CHECKS,
    tags={**ALL_VARIANTS, **GPU},
    description="Only the evaluation group (samples, metrics, probe, results table); upstream is read, not rerun.",
)


retrain_schedule = ScheduleDefinition(
    name="retrain_schedule",
    job=retrain_job,
    cron_schedule=default_profile().operations.retrain_cron,
    default_status=DefaultScheduleStatus.STOPPED,
    description="Periodic rerun of the whole graph (cron: the profile's operations.retrain_cron). Off until "
    "switched on in the UI; with nothing new in the source every step is reused.",
)


@sensor(
    job=retrain_job,
    minimum_interval_seconds=default_profile().operations.watch_interval_s,
    default_status=DefaultSensorStatus.STOPPED,
    description="Lists the profile's source (folder, S3 prefix, archive) and requests one retrain run per new "
    "listing whose shards are not yet in the store; the run key is the listing hash.",
)
def new_images_sensor(context: SensorEvaluationContext, profile: ProfileResource, store: StoreResource):
    plan = Plan.from_listing(profile.profile(), store.store())
    keys = {s: plan.shards(s).key for s in SPLITS}
    listing = data_version(keys).value
    if listing == context.cursor:
        return SkipReason(f"source unchanged since the last tick (listing {listing})")
    context.update_cursor(listing)
    missing = [s for s in SPLITS if plan.shards(s).manifest() is None]
    if not missing:
        return SkipReason(f"listing {listing}: shards already in the store, nothing new to train on")
    context.log.info(f"new listing {listing}: {', '.join(missing)} not sharded yet; requesting a retrain run")
    return RunRequest(run_key=f"listing-{listing}", tags={**ALL_VARIANTS, **GPU, LISTING_TAG: listing})


def failure_summary(context: RunFailureSensorContext) -> str:
    """Which run failed, over which partitions, in which steps, with which error, and what to do."""
    run = context.dagster_run
    tags = run.tags
    scope = tags.get("dagster/partition") or (
        f"{tags[ASSET_PARTITION_RANGE_START_TAG]}..{tags[ASSET_PARTITION_RANGE_END_TAG]}"
        if ASSET_PARTITION_RANGE_START_TAG in tags
        else "unpartitioned"
    )
    lines = [f"run {run.run_id} of job {run.job_name} failed (partitions: {scope})"]
    for event in context.get_step_failure_events():
        error = event.step_failure_data.error
        while error is not None and error.cause is not None:  # past Dagster's wrapper to the user error
            error = error.cause
        message = error.message.strip() if error else "no error recorded"
        lines.append(f"  step {event.step_key}: {message}")
    if len(lines) == 1:
        lines.append(f"  run-level failure: {context.failure_event.message}")
    lines.append(
        "  rerun the same selection: finished steps are reused from the store and training resumes from its "
        "last store checkpoint"
    )
    return "\n".join(lines)


@run_failure_sensor(
    default_status=DefaultSensorStatus.RUNNING,
    description="Logs a one-screen summary of every failed run: failed steps, their errors, how to resume.",
)
def run_failure_summary(context: RunFailureSensorContext) -> None:
    context.log.error(failure_summary(context))
