"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from dagster import Definitions, define_asset_job

from assets.data import image_shards, raw_images
from assets.resources import ProfileResource, StoreResource
from assets.tokenizer import tokenizer

shard_job = define_asset_job("shard_images", selection=[image_shards])
tokenizer_job = define_asset_job("train_tokenizers", selection=[tokenizer])

defs = Definitions(
    assets=[raw_images, image_shards, tokenizer],
    jobs=[shard_job, tokenizer_job],
    resources={"store": StoreResource(), "profile": ProfileResource()},
)
