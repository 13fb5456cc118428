"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from dagster import Definitions, define_asset_job

from assets.data import image_shards, raw_images
from assets.resources import ProfileResource, StoreResource

shard_job = define_asset_job("shard_images", selection=[image_shards])

defs = Definitions(
    assets=[raw_images, image_shards],
    jobs=[shard_job],
    resources={"store": StoreResource(), "profile": ProfileResource()},
)
