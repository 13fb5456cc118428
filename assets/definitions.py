"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from dagster import Definitions, define_asset_job

from assets.data import image_shards, raw_images
from assets.resources import ProfileResource, StoreResource
from assets.tokenizer import tokenizer
from assets.tokens import token_dataset

shard_job = define_asset_job("shard_images", selection=[image_shards])
tokenizer_job = define_asset_job("train_tokenizers", selection=[tokenizer])
tokens_job = define_asset_job("export_tokens", selection=[token_dataset])

defs = Definitions(
    assets=[raw_images, image_shards, tokenizer, token_dataset],
    jobs=[shard_job, tokenizer_job, tokens_job],
    resources={"store": StoreResource(), "profile": ProfileResource()},
)
