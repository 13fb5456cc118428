"""Stage-1 assets: the 2D baseline and the Prologue tokenizer, one partition each."""

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    BackfillPolicy,
    MetadataValue,
    PipesSubprocessClient,
    asset,
)

from assets import checks
from assets.data import WorkerReports, image_shards, per_variant, png_markdown
from assets.resources import ACCELERATOR_POOL, ProfileResource, StoreResource, run_plan, variant_partitions
from pipelines import train_tokenizer
from pipelines.plan import CODE_VERSIONS

# a run may cover every variant (the retrain job): each asset then loops over its partitions
ONE_RUN = BackfillPolicy.single_run()


@asset(
    partitions_def=variant_partitions,
    backfill_policy=ONE_RUN,
    deps=[AssetDep(image_shards, partition_mapping=AllPartitionMapping())],
    code_version=CODE_VERSIONS["tokenizer"],
    pool=ACCELERATOR_POOL,
    group_name="tokenizer",
    kinds={"pytorch", "safetensors"},
    check_specs=[
        checks.spec("weights_finite", "tokenizer", "no NaN/Inf in the tokenizer and prior weights"),
        checks.spec("codebook_usage", "tokenizer", "fraction of each codebook used on val >= operations floor"),
    ],
    description="Stage-1 tokenizer (baseline: z_len = 0, no joint prior; prologue: prologue tokens trained "
    "only through the joint AR CE), trained data-parallel in a subprocess, resumable from store checkpoints.",
)
def tokenizer(
    context: AssetExecutionContext,
    store: StoreResource,
    profile: ProfileResource,
    pipes_subprocess_client: PipesSubprocessClient,
):
    plan = run_plan(context.instance, profile, store)
    prof, finite, usage = plan.profile, {}, {}
    workers = WorkerReports(context, pipes_subprocess_client)  # rank 0 reports its steps and metrics

    def step(variant: str):
        result = train_tokenizer.train_tokenizer(plan, variant, on_log=context.log.info, progress=False,
                                                 runner=workers)  # fmt: skip
        art = result.artifact
        finite[variant] = checks.finite_problems(art, full=not result.cached)  # reused: sizes only
        usage[variant] = checks.codebook_problems(art, prof.operations.codebook_usage_floor)
        numbers, source = workers.numbers(result)
        metrics = numbers["metrics"]
        metadata = {
            "steps": numbers["counts"]["steps"],
            "val_psnr_db": round(metrics["psnr_db"], 3),
            "val_l1": round(metrics["l1"], 5),
            "val_images": metrics["images"],
            "visual_codes_used": round(metrics["visual_codes"]["fraction_used"], 4),
            "visual_codes_perplexity": round(metrics["visual_codes"]["perplexity"], 1),
            "ranks": metrics["ranks"],
            "trainable_parameters": metrics["trainable_parameters"],
            "reconstructions": png_markdown(art, "reconstructions.png", "val: originals (top), EMA recon"),
            "loss_curves": png_markdown(art, "loss_curves.png", "loss curves"),
            "metrics_from": source,
        }
        if "prologue_codes" in metrics:
            metadata["prologue_codes_used"] = round(metrics["prologue_codes"]["fraction_used"], 4)
            metadata["prologue_codes_used_per_position"] = MetadataValue.json(
                metrics["prologue_codes"]["used_per_position"]
            )
        return result, metadata

    yield per_variant(context, step)
    yield checks.check_result("weights_finite", finite)
    yield checks.check_result("codebook_usage", usage)
