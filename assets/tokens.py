"""Stage-2 asset: the pre-tokenised dataset (Parquet + WebDataset), one partition per variant."""

import dataclasses

from dagster import AssetExecutionContext, MetadataValue, PipesSubprocessClient, asset

from assets import checks
from assets.data import WorkerReports, per_variant, png_markdown
from assets.resources import ACCELERATOR_POOL, ProfileResource, StoreResource, run_plan, variant_partitions
from assets.tokenizer import ONE_RUN, tokenizer
from pipelines import token_export
from pipelines.plan import CODE_VERSIONS


@asset(
    partitions_def=variant_partitions,
    backfill_policy=ONE_RUN,
    deps=[tokenizer],
    code_version=CODE_VERSIONS["token_dataset"],
    pool=ACCELERATOR_POOL,
    group_name="tokens",
    kinds={"parquet", "webdataset"},
    check_specs=[checks.spec("tokens_intact", "token_dataset", "sha256 of every file, Parquet row counts")],
    description="Every image encoded once by the frozen tokenizer (train: configured augmentation, one row per "
    "view; val: centre only), stored twice with identical rows: Parquet and WebDataset. A reconstruction sanity "
    "check runs before the full encode.",
)
def token_dataset(
    context: AssetExecutionContext,
    store: StoreResource,
    profile: ProfileResource,
    pipes_subprocess_client: PipesSubprocessClient,
):
    plan, problems = run_plan(context.instance, profile, store), {}
    workers = WorkerReports(context, pipes_subprocess_client)  # rank 0 reports the counts once all ranks are done

    def step(variant: str):
        result = token_export.export_tokens(plan, variant, on_log=context.log.info, progress=False, runner=workers)
        m, art = result.manifest, result.artifact
        problems[variant] = checks.token_problems(art, full=not result.cached)  # reused: sizes only
        numbers, source = workers.numbers(result)
        counts, sanity = numbers["counts"], m.sanity  # the sanity check runs in the parent, before the worker
        return result, {
            "train_rows": counts["rows"]["train"],
            "val_rows": counts["rows"]["val"],
            "tokens": counts["tokens"],
            "views": MetadataValue.json(m.views),
            "bytes_per_token_parquet": counts["bytes_per_token"]["parquet"],
            "bytes_per_token_wds": counts["bytes_per_token"]["wds"],
            "parquet": MetadataValue.path(art.file_uri("parquet")),
            "webdataset": MetadataValue.path(art.file_uri("wds")),
            "codes": MetadataValue.json(dataclasses.asdict(m.codes)),
            "sanity_psnr_db": sanity["psnr_db"],
            "tokenizer_psnr_db": round(sanity["tokenizer_psnr_db"], 4),
            "sanity": png_markdown(art, "sanity.png", "val originals (top), decoded from stored codes"),
            "metrics_from": source,
        }

    yield per_variant(context, step)
    yield checks.check_result("tokens_intact", problems)
