"""The results table: one row per variant from the stored artefacts, as Parquet and Markdown.

Every number is read from a materialised artefact (tokenizer, AR model, evaluation metrics), never
typed by hand; metric columns carry their evaluator. Standalone: `python -m pipelines.results`.
"""

from __future__ import annotations

import io
import logging
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.figures import budget_png, side_by_side
from pipelines.manifests import read
from pipelines.plan import CODE_VERSIONS, MissingInput, Plan, Target, cached_or_run
from pipelines.store import StepResult, machine_label
from pipelines.variants import group_rows, parse_variant

ASSET = "results_table"
log = logging.getLogger(__name__)


DOMAIN_FIGURES = ("fd_domain", "class_consistency", "fd_domain_ar_only")


def _generation_columns(ev: str) -> list[tuple[str, str, str]]:
    """(row column, guidance, metric key) of the generation figures in a results row."""
    return [
        (f"gfd_{ev}_cfg", "cfg", f"fd_{ev}"),
        (f"gfd_{ev}_nocfg", "nocfg", f"fd_{ev}"),
        (f"is_{ev}_cfg", "cfg", f"is_{ev}_mean"),
        (f"is_{ev}_nocfg", "nocfg", f"is_{ev}_mean"),
        (f"precision_{ev}_cfg", "cfg", f"precision_{ev}"),
        (f"recall_{ev}_cfg", "cfg", f"recall_{ev}"),
        *[(f"{k}_{g}", g, k) for k in DOMAIN_FIGURES for g in ("cfg", "nocfg")],
    ]


def _row(plan: Plan, variant: str) -> dict[str, Any]:
    """One variant's row, read from the manifests of its tokenizer, AR model and metric artefacts."""
    tok, ar = plan.tokenizer(variant).require(), plan.ar(variant).require()
    rec = plan.reconstruction(variant).require().metrics
    gen = plan.generation(variant).require().metrics
    probe = plan.probe(variant).require().metrics
    ev = plan.profile.evaluation.evaluator
    z = plan.profile.tokenizer_for(variant).z_len or plan.profile.tokenizer.z_len
    probe_on = "prologue" if "prologue" in probe else f"first_visual_z{z}"
    first = {int(k.split("_z")[1]): v["top1"] for k, v in probe.items() if k.startswith("first_visual_z")
             and not k.endswith("_onehot")}  # fmt: skip
    spread = {}  # sample std over sampling runs, when there are several
    if "over_seeds" in gen:
        spread = {f"{name}_std": gen["over_seeds"][g][key]["std"] for name, g, key in _generation_columns(ev)}
        gen = {g: {k: v["mean"] for k, v in gen["over_seeds"][g].items()} for g in ("cfg", "nocfg")} | {
            k: v for k, v in gen.items() if k not in ("cfg", "nocfg")
        }
    inception = {}
    if "rfid_inception" in rec:
        inception = {
            "rfid_inception": rec["rfid_inception"],
            "gfid_inception_cfg": gen["cfg"]["fid_inception"],
            "gfid_inception_nocfg": gen["nocfg"]["fid_inception"],
            "is_inception_cfg": gen["cfg"]["is_inception_mean"],
        }
    return {
        "variant": variant,
        f"rfd_{ev}": rec[f"rfd_{ev}"],
        "psnr_db": rec["psnr_db"],
        **{name: gen[g][key] for name, g, key in _generation_columns(ev)},
        **spread,
        "sampling_runs": len(gen.get("seeds", [0])),
        **inception,
        "probe_top1": probe[probe_on]["top1"],
        "probe_onehot_top1": probe[f"{probe_on}_onehot"]["top1"],
        "probe_on": probe_on.split("_z")[0],
        "probe_tokens": z,
        "probe_first_visual_top1": {str(k): v for k, v in sorted(first.items())},
        "probe_all_visual_top1": probe["all_visual"]["top1"],
        **_domain_mechanism_tuning(plan, variant, rec),
        **_code_usage(tok.metrics),
        "tokenizer_trainable_parameters": tok.metrics["trainable_parameters"],
        "tokenizer_steps": tok.counts.steps,
        "ar_parameters": ar.counts.parameters,
        "ar_steps": ar.counts.steps,
        "ar_val_ce_visual": ar.metrics["val_ce_visual"],
        "samples_per_guidance": int(gen["cfg"]["samples"]),
        "reference_images": gen["reference_images"],
        "reference_sha256": gen["reference_sha256"][:12],
    }


def _code_usage(tok: dict[str, Any]) -> dict[str, Any]:
    """How much of each codebook the tokenizer uses on val: the share of codes used and the perplexity of
    their use (a collapsed prologue uses a handful); None for a variant without a prologue."""
    out: dict[str, Any] = {}
    for book in ("visual", "prologue"):
        used = tok.get(f"{book}_codes") or {}
        out[f"{book}_codes_used"] = used.get("fraction_used")
        out[f"{book}_perplexity"] = used.get("perplexity")
        out[f"{book}_codebook"] = used.get("codebook_size")
    return out


def _domain_mechanism_tuning(plan: Plan, variant: str, rec: dict[str, Any]) -> dict[str, Any]:
    """The domain evaluator's ceilings, the mechanism figures and the selected sampling settings."""
    mech = plan.mechanism(variant).require().metrics
    tuned = plan.tuning(variant).require().metrics
    domain = plan.domain().require().metrics
    tok_seed, ar_seed = plan.profile.tokenizer_train_for(variant).seed, plan.profile.ar_train_for(variant).seed
    return {
        "recon_fd_domain": rec["domain"]["fd_domain"],
        "recon_class_consistency": rec["domain"]["class_consistency"],
        "real_fd_domain": domain["ceiling"]["fd_domain"],
        "real_class_consistency": domain["ceiling"]["class_consistency"],
        "domain_images": domain["ceiling"]["images"],
        "domain_val_top1": domain["val_top1"],
        "domain_reference_images": domain["reference_images"],
        **{f"ar_visual_ce_{k}": v for k, v in mech.get("ar_visual_ce", {}).items()},
        **{f"prior_visual_ce_{k}": v for k, v in mech.get("prior_visual_ce", {}).items()},
        "same_class_pair_rate": mech["same_class_pair_rate"],
        "resample_keep_rate": mech.get("resample_keep_rate"),
        "resampled": mech.get("resampled", 0),
        "sampler_nocfg": tuned["labels"]["nocfg"],
        "sampler_cfg": tuned["labels"]["cfg"],
        "tuning_points": tuned["points"]["nocfg"] + tuned["points"]["cfg"],
        "tuning_samples_per_point": tuned["samples_per_point"],
        "tuning_seed": plan.profile.tuning.seed,
        "sampler_seeds": list(plan.sampling_seeds),
        "train_seeds": f"tokenizer {tok_seed}, AR {ar_seed}",
    }


def _usage(row: dict[str, Any], book: str) -> str:
    """`4 of 64 (perplexity 3.0)`; '—' for a codebook the variant does not have."""
    if row.get(f"{book}_codes_used") is None:
        return "—"
    size = row[f"{book}_codebook"]
    return f"{round(row[f'{book}_codes_used'] * size)} of {size} (perplexity {row[f'{book}_perplexity']:.1f})"


def _probed(row: dict[str, Any]) -> str:
    n = row["probe_tokens"]
    return f"{n} prologue" if row["probe_on"] == "prologue" else f"first {n} visual"


# Figures summarised over training seeds (each seed's value is its mean over the sampling runs).
SEED_FIGURES = ("rfd_{ev}", "psnr_db", "gfd_{ev}_cfg", "gfd_{ev}_nocfg", "fd_domain_cfg", "fd_domain_nocfg",
                "class_consistency_cfg", "class_consistency_nocfg", "probe_top1")  # fmt: skip


def over_training_seeds(rows: list[dict[str, Any]], ev: str) -> list[dict[str, Any]]:
    """One entry per group of two or more rows that differ only by training seed (`baseline`,
    `baseline_s1`, ...): the variants, and each figure's mean and sample std over them."""
    out = []
    for group, members in group_rows(rows, lambda v: v.seed_group).items():
        if len(members) < 2:
            continue
        entry: dict[str, Any] = {"group": group, "variants": [m["variant"] for m in members]}
        for figure in SEED_FIGURES:
            values = [m.get(figure.format(ev=ev)) for m in members]
            if None not in values:
                entry[figure.format(ev=ev)] = {"mean": statistics.fmean(values), "std": statistics.stdev(values)}
        out.append(entry)
    return out


def _gap_words(figure: str, gap: float, spread: float | None) -> str:
    """`fd_domain_nocfg -1.369 (spread 2.282: inside)`: inside when |gap| is no larger than the spread."""
    where = "" if spread is None else f" (spread {spread:.3f}: {'outside' if abs(gap) > spread else 'inside'})"
    return f"{figure} {gap:+.3f}{where}"


def _seed_figures(ev: str) -> list[str]:
    return [f.format(ev=ev) for f in SEED_FIGURES]


def _pooled_seed_std(rows: list[dict[str, Any]], ev: str) -> dict[str, float]:
    """Each figure's training-seed std pooled over the table's seed groups (root mean square of their
    sample stds); empty without seed groups."""
    summary = over_training_seeds(rows, ev)
    stds = {f: [g[f]["std"] for g in summary if f in g] for f in _seed_figures(ev)}
    return {f: statistics.fmean(x * x for x in s) ** 0.5 for f, s in stds.items() if s}


def _group_gap(groups: dict[str, list[dict[str, Any]]], a: str, b: str, pooled: dict[str, float],
               ev: str) -> dict[str, Any]:  # fmt: skip
    """Group `a`'s mean minus group `b`'s per figure. The spread of a difference of two means of n and m
    runs is the pooled training-seed std times sqrt(1/n + 1/m); inside when |gap| is no larger; None
    without seed groups."""
    out: dict[str, Any] = {"rows": a, "against": b, "figures": {}}
    for figure in _seed_figures(ev):
        va = [m.get(figure) for m in groups[a]]
        vb = [m.get(figure) for m in groups[b]]
        if None in va or None in vb:
            continue
        std = pooled.get(figure)
        spread = None if std is None else std * (1 / len(va) + 1 / len(vb)) ** 0.5
        diff = statistics.fmean(va) - statistics.fmean(vb)
        out["figures"][figure] = {"gap": diff, "spread": spread,
                                  "inside": None if spread is None else abs(diff) <= spread}  # fmt: skip
    return out


def seed_group_gaps(rows: list[dict[str, Any]], ev: str, against: str = "baseline") -> list[dict[str, Any]]:
    """Each arm with two or more training seeds against the `against` arm's seeds (`prologue` − `baseline`:
    the mean over `prologue`, `prologue_s1` minus that over `baseline`, `baseline_s1`), read against the
    pooled training-seed spread like every gap of the table (_group_gap). Rows with a setting suffix are
    one_setting_gaps' to read."""
    groups = group_rows(rows, lambda v: v.seed_group)
    arms = [g["group"] for g in over_training_seeds(rows, ev) if parse_variant(g["group"]).arm == g["group"]]
    if against not in arms:
        return []
    pooled = _pooled_seed_std(rows, ev)
    return [_group_gap(groups, arm, against, pooled, ev) for arm in arms if arm != against]


def one_setting_gaps(rows: list[dict[str, Any]], ev: str) -> list[dict[str, Any]]:
    """What each ablation row changes: every group of rows with a setting suffix (`_z<N>`, `_ent<W>`,
    `_tok<K>x`, `_ar<K>x`) against its arm without it (`prologue_ent0` − `prologue`), and a prologue arm's
    group against the baseline with the same suffix (`prologue_post_ar4x` − `baseline_ar4x`, beside the arm's
    gap without it). A group's value is its mean over training seeds; the spread is the pooled training-seed
    std, assumed for every arm and setting, times sqrt(1/n + 1/m) (_group_gap)."""
    groups = group_rows(rows, lambda v: v.seed_group)
    pooled = _pooled_seed_std(rows, ev)
    found = []
    for name in groups:
        arm = parse_variant(name).arm
        setting = name[len(arm):]
        if not setting:
            continue
        if arm in groups:
            found.append(_group_gap(groups, name, arm, pooled, ev))
        if arm.startswith("prologue") and f"baseline{setting}" in groups:
            both = arm in groups and "baseline" in groups
            without = _group_gap(groups, arm, "baseline", pooled, ev) if both else None
            found.append(_group_gap(groups, name, f"baseline{setting}", pooled, ev) | {"without_setting": without})
    return found


def _gap_text(entry: dict[str, Any]) -> str:
    parts = [_gap_words(f, g["gap"], g["spread"]) for f, g in entry["figures"].items()]
    text = f"{entry['rows']} − {entry['against']}: " + "; ".join(parts)
    if entry.get("without_setting"):
        base = entry["without_setting"]
        text += f" [without the setting, {base['rows']} − {base['against']}: " + "; ".join(
            _gap_words(f, g["gap"], None) for f, g in base["figures"].items()) + "]"
    return text


# How the table reads every gap, in its text.
SPREAD_WORDS = ("means over training seeds; spread: the training-seed std pooled over the seed groups above "
                "(root mean square), assumed for every arm and setting, times sqrt(1/n + 1/m) for means of n and "
                "m runs, the std of such a difference; with two seeds per group a rough spread")  # fmt: skip


def _setting_lines(settings: list[dict[str, Any]]) -> list[str]:
    if not settings:
        return []
    return ["\nOne setting at a time: each row with a setting suffix against its arm without it, and a prologue "
            f"arm against the baseline with the same setting ({SPREAD_WORDS}):\n"] + [
        f"- {_gap_text(e)}" for e in settings]  # fmt: skip


def _seed_table(rows: list[dict[str, Any]], ev: str) -> list[str]:
    summary = over_training_seeds(rows, ev)
    if not summary:
        return []
    figures = _seed_figures(ev)

    def cell(g: dict[str, Any], figure: str) -> str:
        return f"{g[figure]['mean']:.3f} ± {g[figure]['std']:.3f}" if figure in g else "—"

    lines = ["\nOver training seeds (mean ± sample std over the seeds; each seed's value is its mean over the "
             "sampling runs):\n"]  # fmt: skip
    lines += _table(["group", "variants", *figures], [[g["group"], ", ".join(g["variants"]),
                                                     *(cell(g, f) for f in figures)] for g in summary])  # fmt: skip
    arm_gaps = seed_group_gaps(rows, ev)
    if arm_gaps:
        lines.append(f"\nGaps against the baseline ({SPREAD_WORDS}):\n")
        lines += [f"- {_gap_text(e)}" for e in arm_gaps]
    return lines


def _cell(r: dict[str, Any], key: str, digits: int = 2) -> str:
    """A value with ± its std over sampling runs (if any); '—' where the variant has none."""
    if r.get(key) is None:
        return "—"
    std = r.get(f"{key}_std")
    return f"{r[key]:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _mechanism_table(rows: list[dict[str, Any]]) -> list[str]:
    """Codebook usage, the probe, the CE under each prologue condition and the resampling rates."""
    conditions = ("true", "shuffled_within_class", "shuffled_across_images", "constant")
    lines = _table(
        ["variant", "codes used: visual / prologue", "probe top-1 codebook / one-hot",
         "AR visual CE: true / within-class / across / constant",
         "prior visual CE: true / within-class / across / constant", "resample keeps class", "same-class pairs"],
        [[r["variant"], f"{_usage(r, 'visual')} / {_usage(r, 'prologue')}",
          f"{100 * r['probe_top1']:.1f}% / {100 * r['probe_onehot_top1']:.1f}% ({_probed(r)})",
          " / ".join(_cell(r, f"ar_visual_ce_{c}", 3) for c in conditions),
          " / ".join(_cell(r, f"prior_visual_ce_{c}", 3) for c in conditions),
          _cell(r, "resample_keep_rate", 3), f"{r['same_class_pair_rate']:.3f}"] for r in rows],
    )  # fmt: skip
    lines.append(
        "\nCodes used: the share of a codebook's entries the tokenizer assigns on the val images it was "
        "evaluated on, and the perplexity of their use (its exponentiated entropy: how many codes it spreads "
        "over). Probe: logistic regression on each variant's own tokens (the baseline: its first z visual tokens, "
        "z the prologue length compared). CE per visual token on all val rows. Resampling: "
        f"{max(x['resampled'] for x in rows) or 'no'} fixed-prologue redraws classified like their original "
        "(domain classifier), against two random no-guidance samples of one class classified alike.\n"
    )
    return lines


def markdown(rows: list[dict[str, Any]], ev: str) -> str:
    """Three tables: ImageNet-feature metrics, the domain evaluator's, and the mechanism figures."""
    lines = _table(
        ["variant", f"rFD-{ev}", "PSNR dB", f"gFD-{ev} CFG", f"gFD-{ev} no CFG", f"IS-{ev} CFG", f"P / R-{ev} CFG",
         "AR val CE visual", "AR params", "tok trainable", "steps tok / AR"],
        [[r["variant"], f"{r[f'rfd_{ev}']:.2f}", f"{r['psnr_db']:.2f}", _cell(r, f"gfd_{ev}_cfg"),
          _cell(r, f"gfd_{ev}_nocfg"), _cell(r, f"is_{ev}_cfg"),
          f"{_cell(r, f'precision_{ev}_cfg', 3)} / {_cell(r, f'recall_{ev}_cfg', 3)}", f"{r['ar_val_ce_visual']:.3f}",
          f"{r['ar_parameters'] / 1e6:.2f}M", f"{r['tokenizer_trainable_parameters'] / 1e6:.3f}M",
          f"{r['tokenizer_steps']} / {r['ar_steps']}"] for r in rows],
    )  # fmt: skip
    r = rows[0]
    lines.append(
        f"\n{r['samples_per_guidance']} samples per guidance setting and variant"
        + (f" in each of {r['sampling_runs']} sampling runs (mean ± sample std)" if r["sampling_runs"] > 1 else "")
        + f"; reference: the first {r['reference_images']} val images (stats sha256 {r['reference_sha256']}…); "
        f"evaluator {ev} (EfficientNet-Lite0 features, not InceptionV3: these are not FID/IS values); sampler seeds "
        f"{', '.join(map(str, r['sampler_seeds']))}; one training run per row (training seeds: "
        f"{r['train_seeds']}, an `_s<S>` row seed S), so the ± is the sampling spread only (the spread over "
        "training seeds, where an arm has several rows, is below).\n"
    )
    lines += _table(
        ["variant", "FD-domain recon", "consistency recon", "FD-domain CFG", "FD-domain no CFG", "consistency CFG",
         "consistency no CFG", "AR-only FD-domain CFG", "AR-only FD-domain no CFG"],
        [[r["variant"], f"{r['recon_fd_domain']:.2f}", f"{r['recon_class_consistency']:.3f}",
          _cell(r, "fd_domain_cfg"), _cell(r, "fd_domain_nocfg"), _cell(r, "class_consistency_cfg", 3),
          _cell(r, "class_consistency_nocfg", 3), _cell(r, "fd_domain_ar_only_cfg"),
          _cell(r, "fd_domain_ar_only_nocfg")] for r in rows],
    )  # fmt: skip
    lines.append(
        f"\nDomain evaluator: a CNN trained on the train shards (val top-1 {r['domain_val_top1']:.3f}); FD-domain "
        f"against {r['domain_reference_images']} held-out train images; {r['domain_images']} images per set "
        f"(samples; the first val images and their reconstructions). Real val images (ceiling): FD-domain "
        f"{r['real_fd_domain']:.2f}, consistency {r['real_class_consistency']:.3f}. AR-only: samples against the "
        "variant's own val reconstructions.\n"
    )
    lines += _mechanism_table(rows)
    lines += _table(["variant", "sampling no CFG (selected)", "sampling CFG (selected)", "grid points"],
                    [[r["variant"], r["sampler_nocfg"], r["sampler_cfg"], str(r["tuning_points"])] for r in rows])
    lines.append(
        f"\nEach variant searched a grid of the same size, {r['tuning_samples_per_point']} samples per point "
        f"(tuning seed {r['tuning_seed']}), scored by FD-domain against the val split (disjoint from the "
        "reporting reference)."
    )
    lines += _seed_table(rows, ev) + _setting_lines(one_setting_gaps(rows, ev))
    return "\n".join(lines) + "\n"


def _aligned(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column (one Parquet schema), None where a variant has none."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in columns} for r in rows]


def results_table(plan: Plan, partition: None = None, *, on_log=log.info, progress: bool = False) -> StepResult:
    """The table of every variant of the plan; its key hashes the rows, so new numbers are a new table."""
    rows = _aligned([_row(plan, v) for v in plan.profile.variants])
    target = plan.results(rows)
    return cached_or_run(target, lambda: _write(plan, target, rows), on_log)


# The steps of one variant whose time the table reports, in graph order.
VARIANT_STEPS = ("tokenizer", "token_dataset", "ar_model", "sampling_tuning", "samples",
                 "reconstruction_metrics", "generation_metrics", "linear_probe", "mechanism_metrics")  # fmt: skip


def step_times(plan: Plan, variants: list[str] | None = None) -> dict[str, Any]:
    """Wall and CPU seconds of every artefact the table of `variants` (default: the profile's) reads,
    from their manifests' `timing`, and their totals over distinct artefacts (a step shared by several
    variants counts once)."""
    distinct: dict[str, dict[str, float] | None] = {}

    def timing(targets: list[Target]) -> dict[str, float] | None:
        found = [t.artifact.manifest().get("timing") for t in targets]
        distinct.update((t.artifact.path, f) for t, f in zip(targets, found, strict=True))
        if None in found:
            return None  # written before timing was recorded
        return {k: round(sum(f[k] for f in found), 1) for k in ("wall_s", "cpu_s")}

    per_variant = {v: {step: timing(plan.targets(step, v)) for step in VARIANT_STEPS}
                   for v in (plan.profile.variants if variants is None else variants)}  # fmt: skip
    shared = {f"{asset}[{p}]" if p is not None else asset: timing(plan.targets(asset, p))
              for asset in ("image_shards", "domain_classifier", "reference_stats")
              for p in plan.partitions(asset)}  # fmt: skip
    recorded = [t for t in distinct.values() if t is not None]
    total = {k: round(sum(t[k] for t in recorded), 1) for k in ("wall_s", "cpu_s")}
    machines = Counter(machine_label(t["machine"]) if "machine" in t else "not recorded" for t in recorded)
    return {"variants": per_variant, "shared": shared, "total": total, "artefacts": len(distinct),
            "untimed_artefacts": len(distinct) - len(recorded), "machines": dict(machines)}  # fmt: skip


def so_far(plan: Plan, figures: Path | None = None) -> str:
    """The tables of the variants whose every input is in the store, for a profile run under way:
    printed by `--so-far`, never stored (the stored table needs every variant); with `figures`, the
    table's figures of those variants are written there and linked (by that path)."""
    rows, pending = [], []
    for v in plan.profile.variants:
        try:
            rows.append(_row(plan, v))
        except MissingInput:
            pending.append(v)
    if not rows:
        return f"{plan.label}: no variant has all its artefacts yet (pending: {', '.join(pending)})."
    rows = _aligned(rows)
    head = (f"So far ({plan.label}, printed from the store, not a stored table): {len(rows)} of "
            f"{len(plan.profile.variants)} variants finished" + (f"; pending: {', '.join(pending)}" if pending else "")
            + ".\n\n")  # fmt: skip
    times = step_times(plan, [r["variant"] for r in rows])
    text = head + markdown(rows, plan.profile.evaluation.evaluator) + step_times_markdown(times)
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        for name, png in _figures(plan, rows).items():
            (figures / name).write_bytes(png)
            text += f"\n![{FIGURES[name]}]({(figures / name).as_posix()})\n"
    return text


def step_times_markdown(times: dict[str, Any]) -> str:
    """The wall minutes per step and variant, the shared steps, and the total."""

    def cell(t: dict[str, float] | None) -> str:
        return "—" if t is None else f"{t['wall_s'] / 60:.1f}"

    lines = ["\n**Wall time per step** (minutes, of the attempt that wrote each artefact):\n"]
    lines += _table(["variant", *VARIANT_STEPS], [[v, *(cell(steps[s]) for s in VARIANT_STEPS)]
                                                 for v, steps in times["variants"].items()])  # fmt: skip
    shared = ", ".join(f"{name} {cell(t)}" for name, t in times["shared"].items())
    untimed = times["untimed_artefacts"]
    lines.append(
        f"\nShared steps: {shared}. In all {times['total']['wall_s'] / 60:.0f} min of wall time and "
        f"{times['total']['cpu_s'] / 60:.0f} CPU-minutes (the step's process and its workers) over the "
        f"{times['artefacts'] - untimed} of {times['artefacts']} distinct artefacts with a recorded time"
        + (f" (— : {untimed} written before step times were recorded)" if untimed else "")
        + "; a step resumed after an interruption counts its last attempt only, a step shared by "
        "variants once.\n"
    )
    machines = times["machines"]
    if machines:
        written = "; ".join(f"{label} ({n} artefact{'s' if n > 1 else ''})" for label, n in machines.items())
        several = len(machines) > 1 and "not recorded" not in machines
        lines.append(f"Written on: {written}." + (" Several machines: numbers are bit-identical on one "
                     "machine, not across CPU models." if several else "") + "\n")  # fmt: skip
    return "\n".join(lines)


def _write(plan: Plan, target: Target, rows: list[dict[str, Any]]) -> dict:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    times = step_times(plan)
    artifact = target.artifact
    md = markdown(rows, plan.profile.evaluation.evaluator) + step_times_markdown(times)
    files = {
        "results.parquet": artifact.put_bytes("results.parquet", buf.getvalue()).__dict__,
        "results.md": artifact.put_bytes("results.md", md.encode()).__dict__,
    }
    for name, png in _figures(plan, rows).items():
        files[name] = artifact.put_bytes(name, png).__dict__
    return artifact.commit(
        files,
        config={"variants": list(plan.profile.variants)},
        lineage=target.inputs,
        code_version=CODE_VERSIONS[ASSET],
        rows=rows,
        over_training_seeds=over_training_seeds(rows, plan.profile.evaluation.evaluator),
        seed_group_gaps=seed_group_gaps(rows, plan.profile.evaluation.evaluator),
        one_setting_gaps=one_setting_gaps(rows, plan.profile.evaluation.evaluator),
        step_times=times,
        profile=plan.label,
    )


# The table's figures, with what each shows (the README's alt text).
FIGURES = {
    "samples.png": "every variant's first sample set side by side: 8 per class, without and with guidance",
    "resample.png": "fixed-prologue resampling (the first prologue variant): each row a sample, then 7 redraws "
    "of its visual tokens with its prologue kept",
    "budgets.png": "the domain figures against each training budget the profile varies",
}


def _figures(plan: Plan, rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """FIGURES, from the sample sets' grids and the rows (budgets.png only where a budget varies)."""
    grids, resample = {}, None
    for v in (r["variant"] for r in rows):
        art = plan.samples(v)[0].artifact
        grids[v] = {"no CFG": art.read_bytes("grid_nocfg.png"), "CFG": art.read_bytes("grid_cfg.png")}
        if resample is None and plan.profile.tokenizer_for(v).z_len:
            resample = art.read_bytes("resample_visual.png")
    out = {"samples.png": side_by_side(grids)}
    if resample is not None:
        out["resample.png"] = resample
    budgets = budget_png(rows, {"fd_domain_nocfg": "FD-domain, no CFG", "fd_domain_cfg": "FD-domain, CFG",
                                "class_consistency_nocfg": "class consistency, no CFG"})  # fmt: skip
    if budgets is not None:
        out["budgets.png"] = budgets
    return out


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(artifact: Any, profile: str, root: Path = README.parent) -> str:
    """A results artefact as the README shows it: its Markdown tables, then its figures, copied to
    `docs/figures/<profile>/` and linked."""
    text = artifact.read_bytes("results.md").decode()
    files = read(artifact, "results_table").files
    for name, alt in FIGURES.items():
        if name in files:
            dest = root / "docs" / "figures" / profile / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(artifact.read_bytes(name))
            text += f"\n![{alt}](docs/figures/{profile}/{name})\n"
    return text


def copy_into_readme(block: str, text: str, readme: Path = README) -> bool:
    """Replace what stands between `<!-- <block> -->` and the next `<!-- /...` marker in the README
    (generated tables: results by the demo, benchmark figures by bench/run_all.py)."""
    if not readme.exists():
        return False
    content = readme.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(block)} -->\n).*?(<!-- /)", re.S)
    if not pattern.search(content):
        return False
    readme.write_text(pattern.sub(lambda m: m.group(1) + text + m.group(2), content, count=1))
    return True


def into_readme(plan: Plan, artifact: Any) -> str:
    """`--readme`: a results artefact into README.md's `results:<profile>` block (tables, then the
    figures copied to docs/figures/<profile>/), as `make demo` does; says what it did."""
    name, readme = plan.profile.name, README
    if not readme.exists() or f"<!-- results:{name} -->" not in readme.read_text():
        return f"{readme} has no <!-- results:{name} --> block: nothing copied"
    copy_into_readme(f"results:{name}", readme_block(artifact, name, root=readme.parent), readme)
    return f"(copied into {readme}, figures into {readme.parent / 'docs' / 'figures' / name}/)"


def main(argv: list[str] | None = None) -> int:
    from pipelines.runner import step_main

    return step_main(__doc__, argv, ASSET, partitioned=False, summary=lambda m: f"{len(m.rows)} rows",
                     so_far=so_far, readme=into_readme)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
