"""Stage-3 asset: the class-conditional AR model, trained by DeepSpeed in a Dagster Pipes subprocess."""

from dagster import AssetExecutionContext, MetadataValue, PipesSubprocessClient, asset

from assets import checks
from assets.data import WorkerReports, per_variant, png_markdown
from assets.resources import ACCELERATOR_POOL, ProfileResource, StoreResource, run_plan, variant_partitions
from assets.tokenizer import ONE_RUN
from assets.tokens import token_dataset
from pipelines import train_ar
from pipelines.plan import CODE_VERSIONS


@asset(
    partitions_def=variant_partitions,
    backfill_policy=ONE_RUN,
    deps=[token_dataset],
    code_version=CODE_VERSIONS["ar_model"],
    pool=ACCELERATOR_POOL,
    group_name="generator",
    kinds={"pytorch", "deepspeed"},
    check_specs=[checks.spec("weights_finite", "ar_model", "no NaN/Inf in the final and EMA weights")],
    description="Class-conditional AR transformer over [class][prologue][EOS][visual] (baseline: [class][visual]), "
    "trained through a DeepSpeed engine on N processes launched via Dagster Pipes; resumable from store checkpoints.",
)
def ar_model(
    context: AssetExecutionContext,
    store: StoreResource,
    profile: ProfileResource,
    pipes_subprocess_client: PipesSubprocessClient,
):
    plan, finite = run_plan(context.instance, profile, store), {}
    # rank 0 sends its log lines and, at the end, what it stored (counts, metrics, DeepSpeed settings)
    workers = WorkerReports(context, pipes_subprocess_client)

    def step(variant: str):
        result = train_ar.train_ar(plan, variant, on_log=context.log.info, progress=False, runner=workers)
        art = result.artifact
        finite[variant] = checks.finite_problems(art, full=not result.cached)  # reused: sizes only
        numbers, source = workers.numbers(result)
        metrics, counts, ds = numbers["metrics"], numbers["counts"], numbers["deepspeed"]
        metadata = {
            "steps": counts["steps"],
            "parameters": counts["parameters"],
            "final_loss": round(metrics["final"].get("loss", float("nan")), 4),  # OneStage: no stage-3 loss
            "val_ce_visual": round(metrics["val_ce_visual"], 4),
            "val_accuracy_visual": round(metrics["val_accuracy_visual"], 4),
            "val_sequences": metrics["val_sequences"],
            "ranks": metrics["ranks"],
            "bf16": ds["bf16"],
            "deepspeed_config": MetadataValue.json(ds["config"] or {}),  # OneStage: no DeepSpeed run
            "loss_curves": png_markdown(art, "loss_curves.png", "AR training curves"),
            "metrics_from": source,
        }
        if "val_ce_prologue" in metrics:
            metadata["val_ce_prologue"] = round(metrics["val_ce_prologue"], 4)
        return result, metadata

    yield per_variant(context, step)
    yield checks.check_result("weights_finite", finite)
