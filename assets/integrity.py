"""The full integrity checks, on demand: every stored shard and token file re-hashed, every weight
checked for NaN/Inf, for every partition of the profile. The assets' own blocking checks run the
full form only on what their step has just written (reused artefacts: sizes only), so these are what
re-reads the data: from the UI (the asset's *Checks* tab, or the `integrity` job) or weekly."""

from collections.abc import Callable

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
from pipelines.plan import Plan
from pipelines.profiles import SPLITS


def _on_demand(name: str, asset, description: str, problems: Callable[[Plan], dict[str, list[str]]]):
    """A non-blocking check of `asset` whose `problems(plan)` covers every split or variant."""

    @asset_check(name=name, asset=asset, blocking=False, description=description)
    def check(context: AssetCheckExecutionContext, store: StoreResource, profile: ProfileResource) -> AssetCheckResult:
        return check_result(name, problems(run_plan(context.instance, profile, store)))

    return check


def _per_variant(plan: Plan, artifact_of, problems) -> dict[str, list[str]]:
    return {v: problems(artifact_of(plan, v)) for v in plan.profile.variants}


shards_rehash = _on_demand(
    "shards_rehash", image_shards, "Every shard's sha256 against its manifest; counts",
    lambda plan: {s: shard_problems(plan.shards(s).artifact) for s in SPLITS},
)  # fmt: skip
tokens_rehash = _on_demand(
    "tokens_rehash", token_dataset, "Every token file's sha256 and Parquet row counts, every variant",
    lambda plan: _per_variant(plan, lambda p, v: p.tokens(v).artifact, token_problems),
)  # fmt: skip
tokenizer_weights_scan = _on_demand(
    "tokenizer_weights_scan", tokenizer, "No NaN/Inf in any tokenizer or prior weight, every variant",
    lambda plan: _per_variant(plan, lambda p, v: p.tokenizer(v).artifact, finite_problems),
)  # fmt: skip
ar_weights_scan = _on_demand(
    "ar_weights_scan", ar_model, "No NaN/Inf in any AR weight, every variant",
    lambda plan: _per_variant(plan, lambda p, v: p.ar(v).artifact, finite_problems),
)  # fmt: skip


INTEGRITY_CHECKS = [shards_rehash, tokens_rehash, tokenizer_weights_scan, ar_weights_scan]
# what the other jobs leave out (a selection of assets includes every check on them)
ON_DEMAND_CHECKS = AssetSelection.checks(*INTEGRITY_CHECKS)
integrity_job = define_asset_job("integrity", selection=ON_DEMAND_CHECKS)
integrity_schedule = ScheduleDefinition(
    job=integrity_job,
    cron_schedule="0 4 * * 0",  # Sundays 04:00: once a week the whole store is re-read
    default_status=DefaultScheduleStatus.STOPPED,
)
