"""The full integrity checks, on demand: every stored shard and token file re-hashed, every weight
checked for NaN/Inf, for every partition of the profile. The assets' own blocking checks run the
full form only on what their step has just written (reused artefacts: sizes only), so these are what
re-reads the data: from the UI (the asset's *Checks* tab, or the `integrity` job) or weekly."""

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetSelection,
    DefaultScheduleStatus,
    ScheduleDefinition,
    asset_check,
    define_asset_job,
)

from assets.ar import ar_model
from assets.checks import check_result, finite_problems, shard_problems, token_problems
from assets.data import image_shards
from assets.resources import ProfileResource, StoreResource, run_plan
from assets.tokenizer import tokenizer
from assets.tokens import token_dataset
from pipelines.profiles import SPLITS


@asset_check(asset=image_shards, blocking=False, description="Every shard's sha256 against its manifest; counts")
def shards_rehash(
    context: AssetCheckExecutionContext, store: StoreResource, profile: ProfileResource
) -> AssetCheckResult:
    plan = run_plan(context.instance, profile, store)
    return check_result("shards_rehash", {s: shard_problems(plan.shards(s).artifact) for s in SPLITS})


@asset_check(asset=token_dataset, blocking=False, description="Every token file's sha256 and Parquet row counts")
def tokens_rehash(
    context: AssetCheckExecutionContext, store: StoreResource, profile: ProfileResource
) -> AssetCheckResult:
    plan = run_plan(context.instance, profile, store)
    return check_result("tokens_rehash", {v: token_problems(plan.tokens(v).artifact) for v in plan.profile.variants})


@asset_check(asset=tokenizer, blocking=False, description="No NaN/Inf in any tokenizer or prior weight, every variant")
def tokenizer_weights_scan(
    context: AssetCheckExecutionContext, store: StoreResource, profile: ProfileResource
) -> AssetCheckResult:
    plan = run_plan(context.instance, profile, store)
    variants = plan.profile.variants
    return check_result("tokenizer_weights_scan", {v: finite_problems(plan.tokenizer(v).artifact) for v in variants})


@asset_check(asset=ar_model, blocking=False, description="No NaN/Inf in any AR weight, every variant")
def ar_weights_scan(
    context: AssetCheckExecutionContext, store: StoreResource, profile: ProfileResource
) -> AssetCheckResult:
    plan = run_plan(context.instance, profile, store)
    return check_result("ar_weights_scan", {v: finite_problems(plan.ar(v).artifact) for v in plan.profile.variants})


INTEGRITY_CHECKS = [shards_rehash, tokens_rehash, tokenizer_weights_scan, ar_weights_scan]
# what the other jobs leave out (a selection of assets includes every check on them)
ON_DEMAND_CHECKS = AssetSelection.checks(*INTEGRITY_CHECKS)
integrity_job = define_asset_job("integrity", selection=ON_DEMAND_CHECKS)
integrity_schedule = ScheduleDefinition(
    job=integrity_job,
    cron_schedule="0 4 * * 0",  # Sundays 04:00: once a week the whole store is re-read
    default_status=DefaultScheduleStatus.STOPPED,
)
