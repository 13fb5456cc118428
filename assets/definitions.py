"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from dagster import AssetSelection, Definitions, PipesSubprocessClient, define_asset_job

from assets.ar import ar_model
from assets.data import image_shards, raw_images
from assets.evaluation import GROUP, generation_metrics, linear_probe, reconstruction_metrics, results_table, samples
from assets.resources import ProfileResource, StoreResource
from assets.tokenizer import tokenizer
from assets.tokens import token_dataset

shard_job = define_asset_job("shard_images", selection=[image_shards])
tokenizer_job = define_asset_job("train_tokenizers", selection=[tokenizer])
tokens_job = define_asset_job("export_tokens", selection=[token_dataset])
ar_job = define_asset_job("train_ar_models", selection=[ar_model])
evaluation_job = define_asset_job("evaluation", selection=AssetSelection.groups(GROUP))

defs = Definitions(
    assets=[
        raw_images,
        image_shards,
        tokenizer,
        token_dataset,
        ar_model,
        samples,
        reconstruction_metrics,
        generation_metrics,
        linear_probe,
        results_table,
    ],
    jobs=[shard_job, tokenizer_job, tokens_job, ar_job, evaluation_job],
    resources={
        "store": StoreResource(),
        "profile": ProfileResource(),
        "pipes_subprocess_client": PipesSubprocessClient(),
    },
)
