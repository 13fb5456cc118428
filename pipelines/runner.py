"""Run a plan's missing steps in order: what the standalone CLIs do (Dagster does it for the assets).

`python -m pipelines.<step> --profile P [--partition X ...]` lists the source once, computes the
plan and runs every missing upstream step of the chosen partitions, upstream first, announcing
each; what is already in the store is reused.

python -m pipelines.<step> [--profile P] [--partition X ...] [--store URL] [--set FIELD=VALUE ...] [--no-progress]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modeling.config import ConfigError
from pipelines.plan import Plan
from pipelines.profiles import load_profile
from pipelines.store import StepResult, Store

Step = Callable[..., StepResult | list[StepResult]]  # (plan, partition, *, on_log, progress)


def steps() -> dict[str, Step]:
    """Every asset's step function, by asset name (imported here, never by another step)."""
    from pipelines import (
        domain,
        evaluate,
        mechanism,
        results,
        sampling,
        sharding,
        token_export,
        train_ar,
        train_tokenizer,
        tuning,
    )

    return {
        "image_shards": sharding.shard_split,
        "tokenizer": train_tokenizer.train_tokenizer,
        "token_dataset": token_export.export_tokens,
        "ar_model": train_ar.train_ar,
        "sampling_tuning": tuning.sampling_tuning,
        "samples": sampling.generate_samples,
        "reference_stats": evaluate.reference_stats,
        "domain_classifier": domain.domain_classifier,
        "reconstruction_metrics": evaluate.reconstruction_metrics,
        "generation_metrics": evaluate.generation_metrics,
        "linear_probe": evaluate.linear_probe,
        "mechanism_metrics": mechanism.mechanism_metrics,
        "results_table": results.results_table,
    }


def materialised(plan: Plan, asset: str, partition: str | None) -> bool:
    targets = plan.targets(asset, partition)
    return bool(targets) and all(t.manifest() is not None for t in targets)


def run_missing(
    plan: Plan,
    asset: str,
    partitions: list[str | None],
    *,
    on_log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str | None, StepResult | list[StepResult]]:
    """Run every missing step that `asset[partition]` needs, upstream first, then the asset itself;
    returns the asset's result per partition."""
    order = plan.order_of([(asset, p) for p in partitions])
    todo = [n for n in order if n[0] == asset or not materialised(plan, *n)]
    registry, out = steps(), {}
    for i, (a, p) in enumerate(todo, 1):
        label = f"{a}[{p}]" if p is not None else a
        state = "in the store" if materialised(plan, a, p) else "missing: running it"
        on_log(f"==> [{i}/{len(todo)}] {label} ({state})")
        result = registry[a](plan, p, on_log=on_log, progress=progress)
        if "missing" in state:
            seconds = sum(r.seconds for r in (result if isinstance(result, list) else [result]))
            on_log(f"<== {label} done in {seconds:.0f}s")
        if a == asset:
            out[p] = result
    return out


def step_main(
    doc: str,
    argv: list[str] | None,
    asset: str,
    *,
    partitioned: bool = True,
    summary: Callable[[Any], str] = lambda m: "",
    so_far: Callable[[Plan, Path | None], str] | None = None,
    readme: Callable[[Plan, Any], str] | None = None,
) -> int:
    """The command line of one step: the step for the chosen partitions, and its missing upstream;
    with `so_far`, `--so-far [FIGURES_DIR]` prints what the finished inputs show (and writes its
    figures to FIGURES_DIR) and computes nothing; with `readme`, `--readme` hands the step's result
    to it afterwards (it copies the result into the README and says what it did)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("PROLOGUE_PROFILE", "fashion32"))
    if partitioned:
        parser.add_argument("--partition", "--variant", "--split", dest="partitions", action="append",
                            help="partition(s) to materialise: variants, splits or evaluators (default: all)")
    parser.add_argument("--store", default=None, help="store URL (default: $PROLOGUE_STORE or ./store)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a profile field, e.g. --set data.workers=4")
    parser.add_argument("--no-progress", action="store_true")
    if so_far is not None:
        parser.add_argument("--so-far", nargs="?", const="", default=None, metavar="FIGURES_DIR",
                            help="print what the inputs in the store show so far (and write its figures to "
                            "FIGURES_DIR); compute nothing, write nothing to the store")
    if readme is not None:
        parser.add_argument("--readme", action="store_true",
                            help="then copy the result into its block of README.md, as `make demo` does")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        plan = Plan.from_listing(load_profile(args.profile, args.overrides), Store(args.store))
    except ConfigError as e:  # a user's mistake: one line naming the field, before any work
        print(f"error: {e}", file=sys.stderr)
        return 2
    if so_far is not None and args.so_far is not None:
        print(so_far(plan, Path(args.so_far) if args.so_far else None))
        return 0
    chosen = getattr(args, "partitions", None) or plan.partitions(asset)
    results = run_missing(plan, asset, chosen, progress=not args.no_progress)
    for p, result in results.items():
        first = result[0] if isinstance(result, list) else result
        done = "(cached)" if first.cached else f"in {first.seconds:.0f}s"
        label = f"{asset}[{p}]" if p is not None else asset
        print(f"{label}: {summary(first.manifest)} {done} -> {first.artifact.uri}")
        if readme is not None and args.readme:
            print(readme(plan, first.artifact))
    return 0
