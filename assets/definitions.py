"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from dagster import AssetSelection, Definitions, PipesSubprocessClient, define_asset_job

from assets.ar import ar_model
from assets.automation import GPU, evaluation_job, new_images_sensor, retrain_job, retrain_schedule, run_failure_summary
from assets.data import image_shards, raw_images
from assets.evaluation import (
    domain_classifier,
    generation_metrics,
    linear_probe,
    mechanism_metrics,
    reconstruction_metrics,
    reference_stats,
    results_table,
    samples,
    sampling_tuning,
)
from assets.integrity import INTEGRITY_CHECKS, ON_DEMAND_CHECKS, integrity_job, integrity_schedule
from assets.resources import ProfileResource, StoreResource
from assets.tokenizer import tokenizer
from assets.tokens import token_dataset

# one job per stage, for rerunning a stage by hand (partitions chosen in the launchpad)
stage_jobs = [
    define_asset_job("shard_images", selection=AssetSelection.assets(image_shards) - ON_DEMAND_CHECKS),
    define_asset_job("train_tokenizers", selection=AssetSelection.assets(tokenizer) - ON_DEMAND_CHECKS, tags=GPU),
    define_asset_job("export_tokens", selection=AssetSelection.assets(token_dataset) - ON_DEMAND_CHECKS, tags=GPU),
    define_asset_job("train_ar_models", selection=AssetSelection.assets(ar_model) - ON_DEMAND_CHECKS, tags=GPU),
]

defs = Definitions(
    assets=[
        raw_images,
        image_shards,
        tokenizer,
        token_dataset,
        ar_model,
        sampling_tuning,
        samples,
        reference_stats,
        domain_classifier,
        reconstruction_metrics,
        generation_metrics,
        linear_probe,
        mechanism_metrics,
        results_table,
    ],
    asset_checks=INTEGRITY_CHECKS,
    jobs=[retrain_job, evaluation_job, integrity_job, *stage_jobs],
    schedules=[retrain_schedule, integrity_schedule],
    sensors=[new_images_sensor, run_failure_summary],
    resources={
        "store": StoreResource(),
        "profile": ProfileResource(),
        "pipes_subprocess_client": PipesSubprocessClient(),
    },
)
