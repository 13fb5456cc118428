"""`make demo`: materialise every asset of the code location on the default profile, in one run of
the `retrain` job.

Runs against the persistent instance in $DAGSTER_HOME, so the runs, metadata and images show up
afterwards in the UI (`make ui`). Already-materialised artefacts are reused at once. At the end the
results table is printed and copied into the README between its `results:<profile>` markers.
"""

import os
import sys

from dagster import DagsterInstance
from dagster._core.definitions.observe import observe  # observing source assets has no public API

from assets.data import raw_images
from assets.definitions import defs
from pipelines.results import README, copy_into_readme, readme_block

# (asset, metadata keys worth a line on the terminal), in dependency order
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("image_shards", ("train_samples", "val_samples", "train_shards", "train_corrupt_skipped")),
    ("tokenizer", ("val_psnr_db", "visual_codes_used", "prologue_codes_used", "steps", "seconds")),
    ("token_dataset", ("train_rows", "bytes_per_token_parquet", "bytes_per_token_wds", "sanity_psnr_db", "seconds")),
    ("ar_model", ("final_loss", "val_ce_prologue", "val_ce_visual", "steps", "seconds")),
    ("domain_classifier", ("val_top1", "reference_images", "train_seconds", "seconds")),
    ("sampling_tuning", ("selected_nocfg", "selected_cfg", "seconds")),
    ("samples", ("samples_cfg", "samples_nocfg", "seconds")),
    ("reference_stats", ("effnetlite0_images", "effnetlite0_stats_sha256", "effnetlite0_seconds")),
    ("reconstruction_metrics", ("rfd_effnetlite0", "psnr_db", "seconds")),
    ("generation_metrics", ("fd_effnetlite0_nocfg", "fd_domain_nocfg", "class_consistency_nocfg",
                            "fd_domain_ar_only_nocfg", "seconds")),
    ("linear_probe", ("top1_prologue", "top1_prologue_onehot", "top1_all_visual", "seconds")),
    ("mechanism_metrics", ("ar_visual_ce_true", "ar_visual_ce_shuffled_across_images", "resample_keep_rate",
                           "same_class_pair_rate", "seconds")),
    ("results_table", ("seconds",)),
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
    print("==> one run of the `retrain` job: every asset, every variant (reused where already in the store)")
    result = defs.resolve_job_def("retrain").execute_in_process(instance=instance, raise_on_error=False)
    mats = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        mats[(mat.asset_key.to_user_string(), mat.partition)] = {k: v.value for k, v in mat.metadata.items()}
    if not result.success:
        failed = [e.step_key for e in result.all_events if e.is_step_failure]
        print(f"error: run {result.run_id} failed in {failed} (see it in the UI: make ui)", file=sys.stderr)
        return 1
    summary, table = [], ""
    for name, keys in STEPS:
        for (asset_name, partition), md in sorted(mats.items(), key=lambda kv: str(kv[0][1])):
            if asset_name != name:
                continue
            label = f"{name}[{partition}]" if partition else name
            shown = ", ".join(f"{k}={md[k]}" for k in keys if k in md)
            uris = [str(v) for k, v in md.items() if k == "uri" or k.endswith("_uri")]
            summary.append(f"{label}: {shown}\n    -> {' '.join(uris)}")
            table = md.get("table", table)
    print("\n==> results")
    print("\n".join(summary))
    print(f"\n==> results table ({profile.name})\n{table}")
    results_md = mats.get(("results_table", None), {})
    if "cache_key" in results_md:  # the table and its figures, as the README shows them
        artifact = resources["store"].store().artifact("results_table", results_md["cache_key"])
        table = readme_block(artifact, profile.name)
    if copy_into_readme(f"results:{profile.name}", table):
        print(f"(copied into {README}, figures into docs/figures/{profile.name}/)")
    print(f"Dagster instance: {os.environ.get('DAGSTER_HOME')} (run {result.run_id})")
    print("Open the UI with `make ui` and browse http://127.0.0.1:3000 (Assets: metadata, grids, curves, tables).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
