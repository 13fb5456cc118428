"""Does a rerun give the same numbers? One variant rerun into another store, compared with a reference.

    python -m pipelines.reproduce --profile fashion32-full --variant prologue_post \\
        --against /root/runs/store --store /tmp/rerun-store [--step generation_metrics ...] [--json OUT]

runs every step that the chosen steps of the variant need (by default its four metric steps, so the
whole chain from the shards) into `--store` — an empty store reruns everything, one that already holds
artefacts reuses them — and then compares each artefact with the one of the same cache key in the
`--against` store: every number in the two manifests' `metrics` and `counts`, and every file by
sha256. Same key means same code version, config and inputs, so any difference is the machine's or
the code's nondeterminism. It prints one line per artefact and exits 1 when a number differs.
Durations and rates (`seconds`, `*_per_s`) measure the machine's load, not the result: they are
listed as timing, not failed. Files may differ where numbers do not (logs with throughput, plots);
those are listed, not failed.

With `--against-variant [PROFILE:]VARIANT` the reference is another variant's chain instead (the same
config under another name, whose keys differ by the name: fashion32-full's `baseline` and
fashion32-ablations' `baseline_tok3x`), paired step by step; `--store` may then be `--against`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.plan import Plan
from pipelines.profiles import load_profile
from pipelines.runner import run_missing
from pipelines.store import Store

METRIC_STEPS = ("generation_metrics", "reconstruction_metrics", "linear_probe", "mechanism_metrics")
COMPARED = ("metrics", "counts")  # the manifest fields that hold a step's numbers


def is_timing(path: str) -> bool:
    """A duration or a rate (`metrics.train.seconds`, `*.tokens_per_s`): the machine's load, not a result."""
    name = path.rsplit(".", 1)[-1].split("[", 1)[0]
    return name == "seconds" or name.endswith("_per_s")


def numbers(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a nested manifest field, by dotted path (`metrics.cfg.fd_domain`)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{prefix}[{i}]")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield prefix, float(tree)


def compare(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Two manifests of one cache key: the numbers that differ (with |Δ|), the timing numbers that differ,
    the files that differ."""
    a = dict(pair for field in COMPARED for pair in numbers(mine.get(field), field))
    b = dict(pair for field in COMPARED for pair in numbers(theirs.get(field), field))
    changed = {k: abs(a[k] - b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k] and not (math.isnan(a[k])
               and math.isnan(b[k]))}  # fmt: skip
    missing = sorted(k for k in set(a) ^ set(b) if not is_timing(k))
    files_a = {rel: f["sha256"] for rel, f in mine["files"].items()}
    files_b = {rel: f["sha256"] for rel, f in theirs["files"].items()}
    return {
        "numbers": sum(not is_timing(k) for k in a),
        "numbers_identical": sum(not is_timing(k) and k in b and k not in changed for k in a),
        "numbers_differ": {k: d for k, d in changed.items() if not is_timing(k)},
        "timing_differ": [k for k in changed if is_timing(k)],
        "numbers_only_in_one": missing,
        "files": len(files_a),
        "files_differ": sorted(rel for rel in set(files_a) | set(files_b) if files_a.get(rel) != files_b.get(rel)),
    }


def chain(plan: Plan, variant: str, steps: tuple[str, ...]) -> list[Any]:
    """Every artefact the variant's `steps` need, upstream first (each sampling run its own)."""
    return [t for node in plan.order_of([(s, variant) for s in steps]) for t in plan.targets(*node)]


def paired(plan: Plan, variant: str, reference: Plan, reference_variant: str,
           steps: tuple[str, ...]) -> list[tuple[Any, Any]]:  # fmt: skip
    """`variant`'s chain in `plan` beside `reference_variant`'s in `reference`, artefact by artefact. The
    same variant of the same profile pairs each artefact with the one of its own key; another variant
    (the same config under another name, whose keys differ by the name) pairs step by step. Raises
    ValueError when the chains have different steps. Reads no store: a check before any rerun."""
    mine, theirs = chain(plan, variant, steps), chain(reference, reference_variant, steps)
    if [t.asset for t in mine] != [t.asset for t in theirs]:
        raise ValueError(f"{variant} and {reference_variant} have chains of different steps: not comparable")
    return list(zip(mine, theirs, strict=True))


def compare_chains(plan: Plan, variant: str, reference: Plan, reference_variant: str,
                   steps: tuple[str, ...] = METRIC_STEPS) -> list[dict[str, Any]]:  # fmt: skip
    """Each artefact of `variant`'s chain in `plan.store` against the artefact in the same place of
    `reference_variant`'s chain in `reference.store` (`paired`)."""
    report = []
    for t, r in paired(plan, variant, reference, reference_variant, steps):
        entry = {"artefact": t.label, "key": t.key}
        if r.key != t.key:
            entry |= {"against": r.label, "key_against": r.key}
        reference_manifest = r.manifest()
        if reference_manifest is None:
            entry["missing_in_reference"] = True
        else:
            entry |= compare(t.manifest(), reference_manifest)
        report.append(entry)
    return report


def reproduce(plan: Plan, reference: Plan, variant: str, steps: tuple[str, ...] = METRIC_STEPS, *,
              reference_variant: str | None = None, progress: bool = False,
              on_log=print) -> list[dict[str, Any]]:  # fmt: skip
    """Run what `plan.store` lacks of the variant's `steps`, then compare each artefact with the one in the
    same place of `reference`'s chain of `reference_variant` (by default the same variant). Chains that
    cannot be paired fail before anything is rerun."""
    reference_variant = reference_variant or variant
    paired(plan, variant, reference, reference_variant, steps)
    for step in steps:
        run_missing(plan, step, [variant], on_log=on_log, progress=progress)
    return compare_chains(plan, variant, reference, reference_variant, steps)


def summary_line(entry: dict[str, Any]) -> str:
    against = f" against {entry['against']}" if "against" in entry else ""
    if entry.get("missing_in_reference"):
        key = entry.get("key_against", entry["key"])
        return f"{entry['artefact']}{against}: not in the reference store (key {key})"
    differ, one_sided = entry["numbers_differ"], entry["numbers_only_in_one"]
    if not differ:
        numbers_text = f"{entry['numbers_identical']} numbers identical"
        numbers_text += f", {len(one_sided)} in one only" if one_sided else ""
    else:
        worst = max(differ.values(), default=0.0)
        numbers_text = f"{len(differ)} of {entry['numbers']} numbers differ (max |Δ| {worst:.3g}: "
        numbers_text += ", ".join(list(differ)[:3]) + ")"
        numbers_text += f", {len(one_sided)} in one only" if one_sided else ""
    if entry["timing_differ"]:
        numbers_text += f" ({len(entry['timing_differ'])} timing numbers differ, not compared)"
    files = entry["files_differ"]
    files_text = f"{entry['files'] - len(files)} of {entry['files']} files identical" + (
        f" (differ: {', '.join(files[:4])}{' …' if len(files) > 4 else ''})" if files else ""
    )
    return f"{entry['artefact']}{against}: {numbers_text}; {files_text}"


def same_numbers(report: list[dict[str, Any]]) -> bool:
    """No number differs. A number one manifest lacks fails where the keys are one (the same config);
    against another variant it is listed, not failed: a profile may compute more for one step (the
    probe reads the baseline's first z tokens for every prologue length the profile has)."""
    return all(not e.get("missing_in_reference") and not e["numbers_differ"]
               and not (e["numbers_only_in_one"] and "key_against" not in e) for e in report)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--against", required=True, help="the reference store's URL")
    parser.add_argument("--store", required=True, help="the store to rerun into (empty: rerun everything)")
    step_choices = [*METRIC_STEPS, "tokenizer", "token_dataset", "ar_model", "sampling_tuning", "samples"]
    parser.add_argument("--step", dest="steps", action="append", choices=step_choices,
                        help="a step to rerun and compare, with all it needs (default: the metric steps)")
    parser.add_argument("--against-variant", metavar="[PROFILE:]VARIANT",
                        help="compare with this variant's chain in --against (the same config under another "
                             "name, e.g. fashion32-ablations:baseline_tok3x) instead of the same keys; "
                             "--store may then be --against")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if Store(args.store).url == Store(args.against).url and not args.against_variant:
        parser.error("--store and --against are the same store: nothing would be rerun")
    profile = load_profile(args.profile, args.overrides)
    if args.variant not in profile.variants:
        parser.error(f"--variant {args.variant!r} is not a variant of {args.profile} ({', '.join(profile.variants)})")
    plan = Plan.from_listing(profile, Store(args.store))
    reference_profile, reference_variant = profile, args.variant
    if args.against_variant:
        reference_name, _, reference_variant = args.against_variant.rpartition(":")
        reference_profile = load_profile(reference_name, args.overrides) if reference_name else profile
        if reference_variant not in reference_profile.variants:
            parser.error(f"--against-variant {reference_variant!r} is not a variant of {reference_profile.name} "
                         f"({', '.join(reference_profile.variants)})")  # fmt: skip
    reference = Plan(reference_profile, Store(args.against), plan.listing)
    steps = tuple(args.steps or METRIC_STEPS)
    try:  # a user's mistake, told before hours of rerun, not a traceback after them
        paired(plan, args.variant, reference, reference_variant, steps)
    except ValueError as e:
        parser.error(str(e))
    report = reproduce(plan, reference, args.variant, steps, reference_variant=reference_variant,
                       progress=not args.no_progress)  # fmt: skip
    for entry in report:
        print(summary_line(entry))
    same = same_numbers(report)
    verdict = "the same numbers" if same else "NOT the same numbers (above)"
    against = f"{reference.label}'s {reference_variant} in " if args.against_variant else ""
    print(f"{args.variant} of {plan.label} against {against}{args.against}: {verdict} in {len(report)} artefacts")
    if args.json:
        args.json.write_text(json.dumps({"variant": args.variant, "profile": plan.label, "same_numbers": same,
                                         "against_variant": reference_variant,
                                         "against_profile": reference.label,
                                         "artefacts": report}, indent=1))  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
