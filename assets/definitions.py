"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from dagster import Definitions, PipesSubprocessClient, define_asset_job

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
from assets.resources import ProfileResource, StoreResource
from assets.tokenizer import tokenizer
from assets.tokens import token_dataset

# one job per stage, for rerunning a stage by hand (partitions chosen in the launchpad)
stage_jobs = [
    define_asset_job("shard_images", selection=[image_shards]),
    define_asset_job("train_tokenizers", selection=[tokenizer], tags=GPU),
    define_asset_job("export_tokens", selection=[token_dataset], tags=GPU),
    define_asset_job("train_ar_models", selection=[ar_model], tags=GPU),
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
    jobs=[retrain_job, evaluation_job, *stage_jobs],
    schedules=[retrain_schedule],
    sensors=[new_images_sensor, run_failure_summary],
    resources={
        "store": StoreResource(),
        "profile": ProfileResource(),
        "pipes_subprocess_client": PipesSubprocessClient(),
    },
)
