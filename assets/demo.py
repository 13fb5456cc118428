"""`make demo`: materialise every asset of the code location on the default profile.

Runs against the persistent instance in $DAGSTER_HOME, so the runs, metadata and images show up
afterwards in the UI (`make ui`). Already-materialised artefacts are reused at once. At the end the
results table is printed and copied into the README between its `results:<profile>` markers.
"""

import os
import re
import sys
from pathlib import Path

from dagster import AssetsDefinition, DagsterInstance, materialize
from dagster._core.definitions.observe import observe  # observing source assets has no public API

from assets.ar import ar_model
from assets.data import image_shards, raw_images
from assets.definitions import defs
from assets.evaluation import generation_metrics, linear_probe, reconstruction_metrics, results_table, samples
from assets.tokenizer import tokenizer
from assets.tokens import token_dataset

README = Path(__file__).resolve().parents[1] / "README.md"

# (asset, metadata keys worth a line on the terminal), in dependency order
STEPS: list[tuple[AssetsDefinition, tuple[str, ...]]] = [
    (image_shards, ("samples", "shards", "corrupt_skipped")),
    (tokenizer, ("val_psnr_db", "visual_codes_used", "prologue_codes_used", "steps", "seconds")),
    (token_dataset, ("train_rows", "bytes_per_token_parquet", "bytes_per_token_wds", "sanity_psnr_db", "seconds")),
    (ar_model, ("final_loss", "val_ce_prologue", "val_ce_visual", "steps", "seconds")),
    (samples, ("samples_cfg", "samples_nocfg", "seconds")),
    (reconstruction_metrics, ("rfd_effnetlite0", "psnr_db", "seconds")),
    (generation_metrics, ("fd_effnetlite0_cfg", "fd_effnetlite0_nocfg", "seconds")),
    (linear_probe, ("top1_prologue", "top1_first_visual", "top1_all_visual", "seconds")),
    (results_table, ("seconds",)),
]


def copy_into_readme(profile: str, table: str) -> bool:
    """Replace the text between `<!-- results:<profile> -->` and `<!-- /results -->` in the README."""
    if not README.exists():
        return False
    text = README.read_text()
    pattern = re.compile(rf"(<!-- results:{re.escape(profile)} -->\n).*?(<!-- /results -->)", re.S)
    if not pattern.search(text):
        return False
    README.write_text(pattern.sub(lambda m: m.group(1) + table + m.group(2), text))
    return True


def main() -> int:
    instance = DagsterInstance.get()
    resources = defs.resources
    profile = resources["profile"].profile()
    print(f"==> profile {profile.name}@{profile.version}: {profile.description}")
    print(f"==> store {resources['store'].store().url}")
    if not observe([raw_images], instance=instance, resources=resources).success:
        print("error: observing raw_images failed", file=sys.stderr)
        return 1
    summary, table = [], ""
    for asset_def, keys in STEPS:
        name = asset_def.key.to_user_string()
        partitions = asset_def.partitions_def.get_partition_keys() if asset_def.partitions_def else [None]
        for partition in partitions:
            result = materialize([asset_def], partition_key=partition, instance=instance, resources=resources)
            label = f"{name}[{partition}]" if partition else name
            if not result.success:
                print(f"error: {label} failed (see the run in the UI: make ui)", file=sys.stderr)
                return 1
            [mat] = result.get_asset_materialization_events()
            md = {k: v.value for k, v in mat.materialization.metadata.items()}
            shown = ", ".join(f"{k}={md[k]}" for k in keys if k in md)
            summary.append(f"{label}: {shown}\n    -> {md['uri']}")
            table = md.get("table", table)
    print("\n==> results")
    print("\n".join(summary))
    print(f"\n==> results table ({profile.name})\n{table}")
    if copy_into_readme(profile.name, table):
        print(f"(copied into {README})")
    print(f"Dagster instance: {os.environ.get('DAGSTER_HOME')}")
    print("Open the UI with `make ui` and browse http://127.0.0.1:3000 (Assets: metadata, grids, curves, tables).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
