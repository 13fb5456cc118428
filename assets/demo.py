"""`make demo`: materialise every asset of the code location on the default profile.

Runs against the persistent instance in $DAGSTER_HOME, so the runs, metadata and images show up
afterwards in the UI (`make ui`). Already-materialised artefacts are reused at once.
"""

import os
import sys

from dagster import AssetsDefinition, DagsterInstance, materialize
from dagster._core.definitions.observe import observe  # observing source assets has no public API

from assets.ar import ar_model
from assets.data import image_shards, raw_images
from assets.definitions import defs
from assets.tokenizer import tokenizer
from assets.tokens import token_dataset

# (asset, metadata keys worth a line on the terminal), in dependency order
STEPS: list[tuple[AssetsDefinition, tuple[str, ...]]] = [
    (image_shards, ("samples", "shards", "corrupt_skipped")),
    (tokenizer, ("val_psnr_db", "visual_codes_used", "prologue_codes_used", "steps", "seconds")),
    (token_dataset, ("train_rows", "bytes_per_token_parquet", "bytes_per_token_wds", "sanity_psnr_db", "seconds")),
    (ar_model, ("final_loss", "val_ce_prologue", "val_ce_visual", "steps", "seconds")),
]


def main() -> int:
    instance = DagsterInstance.get()
    resources = defs.resources
    profile = resources["profile"].profile()
    print(f"==> profile {profile.name}@{profile.version}: {profile.description}")
    print(f"==> store {resources['store'].store().url}")
    if not observe([raw_images], instance=instance, resources=resources).success:
        print("error: observing raw_images failed", file=sys.stderr)
        return 1
    summary = []
    for asset_def, keys in STEPS:
        name = asset_def.key.to_user_string()
        for partition in asset_def.partitions_def.get_partition_keys():
            result = materialize([asset_def], partition_key=partition, instance=instance, resources=resources)
            if not result.success:
                print(f"error: {name}[{partition}] failed (see the run in the UI: make ui)", file=sys.stderr)
                return 1
            [mat] = result.get_asset_materialization_events()
            md = {k: v.value for k, v in mat.materialization.metadata.items()}
            shown = ", ".join(f"{k}={md[k]}" for k in keys if k in md)
            summary.append(f"{name}[{partition}]: {shown}\n    -> {md['uri']}")
    print("\n==> results")
    print("\n".join(summary))
    print(f"\nDagster instance: {os.environ.get('DAGSTER_HOME')}")
    print("Open the UI with `make ui` and browse http://127.0.0.1:3000 (Assets: metadata, previews, reconstructions).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
