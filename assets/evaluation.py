"""Evaluation assets (group `evaluation`): samples, reconstruction and generation metrics, linear
probe, results table. Metrics are named by their evaluator (`fd_effnetlite0` is not FID)."""

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    PipesSubprocessClient,
    asset,
)

from assets import checks
from assets.ar import ar_model
from assets.data import WorkerReports, data_version, image_shards, materialized, per_variant, png_markdown
from assets.resources import ACCELERATOR_POOL, ProfileResource, StoreResource, run_plan, variant_partitions
from assets.tokenizer import ONE_RUN, tokenizer
from assets.tokens import token_dataset
from pipelines import domain, evaluate, mechanism, results, sampling, tuning
from pipelines.plan import CODE_VERSIONS

GROUP = "evaluation"


@asset(
    deps=[image_shards],
    code_version=CODE_VERSIONS["domain_classifier"],
    pool=ACCELERATOR_POOL,
    group_name=GROUP,
    kinds={"pytorch"},
    check_specs=[checks.spec("domain_accuracy", "domain_classifier", "val top-1 at least evaluation.domain_min_top1")],
    description="The domain evaluator: a small CNN of the data set's classes trained on the train shards minus "
    "evaluation.domain_holdout_shards; its features give fd_domain, its predictions class consistency. Stores the "
    "held-out reference features and the val features (tuning reference, real-image ceiling).",
)
def domain_classifier(context: AssetExecutionContext, store: StoreResource, profile: ProfileResource):
    plan = run_plan(context.instance, profile, store)
    r = domain.domain_classifier(plan, on_log=context.log.info)
    m, floor = r.manifest.metrics, plan.profile.evaluation.domain_min_top1
    yield materialized(r, {
        "val_top1": round(m["val_top1"], 4),
        "reference_top1": round(m["reference_top1"], 4),
        "reference_images": m["reference_images"],
        "val_images": m["val_images"],
        "real_val_ceiling": MetadataValue.json(m["ceiling"]),
        "parameters": m["parameters"],
        "train_seconds": round(m["train"]["seconds"], 1),
    })  # fmt: skip
    low = [f"val top-1 {m['val_top1']:.4f} is below the floor {floor}"] if m["val_top1"] < floor else []
    yield checks.check_result("domain_accuracy", {"domain_classifier": low})


@asset(
    partitions_def=variant_partitions,
    backfill_policy=ONE_RUN,
    deps=[ar_model, tokenizer, domain_classifier],
    code_version=CODE_VERSIONS["sampling_tuning"],
    pool=ACCELERATOR_POOL,
    group_name=GROUP,
    description="The same sampling search for every variant: temperatures without guidance, then guidance scales, "
    "grids of equal size, each point scored by FD-domain against the val split (the tuning reference, disjoint "
    "from the reporting reference); samples use the selected settings.",
)
def sampling_tuning(context: AssetExecutionContext, store: StoreResource, profile: ProfileResource):
    plan = run_plan(context.instance, profile, store)

    def step(variant: str):
        r = tuning.sampling_tuning(plan, variant, on_log=context.log.info)
        m = r.manifest.metrics
        flat = {f"selected_{g}": MetadataValue.json({k: m["selected"][g][k] for k in tuning.KNOBS})
                for g in ("nocfg", "cfg")}  # fmt: skip
        return r, {**flat, "points": MetadataValue.json(m["points"]), "samples_per_point": m["samples_per_point"],
                   "grid": MetadataValue.json(m["grid"])}  # fmt: skip

    return per_variant(context, step)


@asset(
    partitions_def=variant_partitions,
    backfill_policy=ONE_RUN,
    deps=[ar_model, sampling_tuning],
    code_version=CODE_VERSIONS["samples"],
    pool=ACCELERATOR_POOL,
    group_name=GROUP,
    kinds={"pytorch", "webdataset"},
    check_specs=[
        checks.spec("sampling_protocol", "samples", "sample count, per-class balance, unique seeds, image size, format")
    ],
    description="N samples per class from the AR model, with and without classifier-free guidance, as lossless "
    "PNG WebDataset shards with a recorded seed per sample; resumable.",
)
def samples(
    context: AssetExecutionContext,
    store: StoreResource,
    profile: ProfileResource,
    pipes_subprocess_client: PipesSubprocessClient,
):
    plan, problems = run_plan(context.instance, profile, store), {}
    prof = plan.profile
    workers = WorkerReports(context, pipes_subprocess_client)  # rank 0 reports counts and sampler settings

    def step(variant: str):
        # one sample set per sampling run (seed), each checked against the protocol
        runs = sampling.generate_samples(plan, variant, on_log=context.log.info, progress=False, runner=workers)
        problems[variant] = [p for r in runs for p in sampling.protocol_problems(r.artifact, r.manifest, prof)]
        result = runs[0]
        m, art = result.manifest, result.artifact
        numbers, source = workers.numbers(result)
        counts, samplers = numbers["counts"], numbers["samplers"]
        metadata = {
            "samples_cfg": counts["samples"]["cfg"],
            "samples_nocfg": counts["samples"]["nocfg"],
            "per_class": prof.evaluation.samples_per_class,
            "sampler_cfg": MetadataValue.json({k: samplers["cfg"][k] for k in tuning.KNOBS}),
            "sampler_nocfg": MetadataValue.json({k: samplers["nocfg"][k] for k in tuning.KNOBS}),
            "sampling_runs": len(runs),
            "seed_rule": m.seed_rule,
            "grid_cfg": png_markdown(art, "grid_cfg.png", "with guidance: 8 samples per class (rows)"),
            "grid_nocfg": png_markdown(art, "grid_nocfg.png", "without guidance: 8 samples per class"),
            "metrics_from": source,
        }
        if "resample_visual.png" in m.files:
            metadata["resample_visual"] = png_markdown(
                art, "resample_visual.png", "first column: a sample; the rest keep its prologue, new visual tokens"
            )
        return runs, metadata

    yield per_variant(context, step)
    yield checks.check_result("sampling_protocol", problems)


@asset(
    deps=[image_shards],
    code_version=CODE_VERSIONS["reference_stats"],
    group_name=GROUP,
    kinds={"numpy"},
    description="Features and (mu, sigma) of the reference set (the first evaluation.reference_images val images) "
    "under each evaluator: EfficientNet-Lite0, and InceptionV3 when a local weights file is configured.",
)
def reference_stats(context: AssetExecutionContext, store: StoreResource, profile: ProfileResource):
    plan, metadata, keys = run_plan(context.instance, profile, store), {}, {}
    for e in plan.evaluators:
        r = evaluate.reference_stats(plan, e, on_log=context.log.info)
        keys[e] = r.artifact.key
        metadata |= {
            f"{e}_uri": MetadataValue.path(r.artifact.uri),
            f"{e}_images": r.manifest.counts.images,
            f"{e}_stats_sha256": r.manifest.stats_sha256,
            f"{e}_reused_existing": r.cached,
            f"{e}_seconds": round(r.seconds, 2),
        }
    return MaterializeResult(metadata={"profile": plan.label, **metadata}, data_version=data_version(keys))


def _metrics_metadata(result, flat: dict) -> dict:
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in flat.items()}
    return {**shown, "metrics": MetadataValue.json(result.manifest.metrics)}


@asset(
    partitions_def=variant_partitions,
    backfill_policy=ONE_RUN,
    deps=[tokenizer, reference_stats, domain_classifier],
    code_version=CODE_VERSIONS["reconstruction_metrics"],
    group_name=GROUP,
    description="rFD (EfficientNet-Lite0 features of val reconstructions vs the val reference set), PSNR, and the "
    "domain evaluator's reconstruction ceiling (fd_domain, class consistency of the first N val reconstructions).",
)
def reconstruction_metrics(context: AssetExecutionContext, store: StoreResource, profile: ProfileResource):
    plan = run_plan(context.instance, profile, store)

    def step(variant: str):
        r = evaluate.reconstruction_metrics(plan, variant, on_log=context.log.info)
        m = r.manifest.metrics
        keys = [k for k in m if k.startswith("rfd_")] + ["psnr_db", "images", "reference_sha256"]
        return r, _metrics_metadata(r, {k: m[k] for k in keys})

    return per_variant(context, step)


@asset(
    partitions_def=variant_partitions,
    backfill_policy=ONE_RUN,
    deps=[samples, reference_stats, domain_classifier, reconstruction_metrics],
    code_version=CODE_VERSIONS["generation_metrics"],
    group_name=GROUP,
    check_specs=[
        checks.spec("reference_checksum", "generation_metrics", "the reference statistics are the stored ones (sha256)")
    ],
    description="gFD, KID, precision/recall and IS-style score (EfficientNet-Lite0) of the samples with and "
    "without guidance against the val reference set; fd_domain, class consistency and the AR-only distance "
    "(samples vs the variant's own val reconstructions) under the domain evaluator.",
)
def generation_metrics(context: AssetExecutionContext, store: StoreResource, profile: ProfileResource):
    plan, problems = run_plan(context.instance, profile, store), {}
    st = plan.store

    def step(variant: str):
        r = evaluate.generation_metrics(plan, variant, on_log=context.log.info)
        m = r.manifest.metrics
        problems[variant] = []
        for e, sha in m["references"].items():  # every reference used must still re-hash to what the metrics used
            ref = st.artifact("reference_stats", r.manifest.lineage[f"reference_stats/{e}"])
            try:
                evaluate.load_reference(ref)  # re-hashes stats.npz against its manifest
                if ref.manifest()["stats_sha256"] != sha:
                    problems[variant].append(f"{e}: metrics were computed against other statistics")
            except ValueError as err:
                problems[variant].append(str(err))
        flat = {f"{k}_{g}": v for g in sampling.GUIDANCE for k, v in m[g].items()}
        return r, _metrics_metadata(r, flat | {"reference_sha256": m["reference_sha256"]})

    yield per_variant(context, step)
    yield checks.check_result("reference_checksum", problems)


@asset(
    partitions_def=variant_partitions,
    backfill_policy=ONE_RUN,
    deps=[token_dataset],
    code_version=CODE_VERSIONS["linear_probe"],
    group_name=GROUP,
    description="Top-1 of a logistic regression (fixed L-BFGS budget) on embedded tokens: prologue tokens, the "
    "first z_len visual tokens, all visual tokens.",
)
def linear_probe(context: AssetExecutionContext, store: StoreResource, profile: ProfileResource):
    plan = run_plan(context.instance, profile, store)

    def step(variant: str):
        r = evaluate.linear_probe(plan, variant, on_log=context.log.info)
        m = r.manifest.metrics
        return r, _metrics_metadata(r, {f"top1_{k}": v["top1"] for k, v in m.items() if isinstance(v, dict)})

    return per_variant(context, step)


@asset(
    partitions_def=variant_partitions,
    backfill_policy=ONE_RUN,
    deps=[ar_model, tokenizer, token_dataset, samples, domain_classifier],
    code_version=CODE_VERSIONS["mechanism_metrics"],
    group_name=GROUP,
    description="Does the model read its prologue? Val CE per visual token of the AR and of the joint prior with "
    "true, within-class-shuffled, across-image-shuffled and constant prologues; the share of fixed-prologue "
    "resamples classified like their original against random same-class pairs (domain classifier).",
)
def mechanism_metrics(context: AssetExecutionContext, store: StoreResource, profile: ProfileResource):
    plan = run_plan(context.instance, profile, store)

    def step(variant: str):
        r = mechanism.mechanism_metrics(plan, variant, on_log=context.log.info)
        m = r.manifest.metrics
        flat = {f"ar_visual_ce_{k}": v for k, v in m.get("ar_visual_ce", {}).items()}
        flat |= {f"prior_visual_ce_{k}": v for k, v in m.get("prior_visual_ce", {}).items()}
        flat |= {k: m[k] for k in ("same_class_pair_rate", "resample_keep_rate") if k in m}
        return r, _metrics_metadata(r, flat)

    return per_variant(context, step)


@asset(
    deps=[
        AssetDep(a, partition_mapping=AllPartitionMapping())
        for a in (reconstruction_metrics, generation_metrics, linear_probe, mechanism_metrics, ar_model)
    ],
    code_version=CODE_VERSIONS["results_table"],
    group_name=GROUP,
    kinds={"parquet"},
    description="One row per variant: rFD, gFD with/without CFG, IS, P/R, probe accuracy, sizes and steps; "
    "Parquet + Markdown, read from the stored artefacts.",
)
def results_table(context: AssetExecutionContext, store: StoreResource, profile: ProfileResource):
    r = results.results_table(run_plan(context.instance, profile, store), on_log=context.log.info)
    md = r.artifact.read_bytes("results.md").decode()
    metadata = {"table": MetadataValue.md(md), "parquet": MetadataValue.path(r.artifact.file_uri("results.parquet"))}
    if "samples.png" in r.manifest.files:
        metadata["samples"] = png_markdown(r.artifact, "samples.png", "samples per variant: no CFG, CFG")
    if "budgets.png" in r.manifest.files:
        metadata["budgets"] = png_markdown(r.artifact, "budgets.png", "domain figures against budget")
    return materialized(r, metadata)
