"""The results table: one row per variant from the stored artefacts, as Parquet and Markdown.

Every number is read from a materialised artefact (tokenizer, AR model, evaluation metrics), never
typed by hand; metric columns carry their evaluator. Standalone: `python -m pipelines.results`.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.store import StepResult

ASSET = "results_table"
log = logging.getLogger(__name__)


def _generation_columns(ev: str) -> list[tuple[str, str, str]]:
    """(row column, guidance, metric key) of the generation figures in a results row."""
    return [
        (f"gfd_{ev}_cfg", "cfg", f"fd_{ev}"),
        (f"gfd_{ev}_nocfg", "nocfg", f"fd_{ev}"),
        (f"is_{ev}_cfg", "cfg", f"is_{ev}_mean"),
        (f"is_{ev}_nocfg", "nocfg", f"is_{ev}_mean"),
        (f"precision_{ev}_cfg", "cfg", f"precision_{ev}"),
        (f"recall_{ev}_cfg", "cfg", f"recall_{ev}"),
    ]


def _row(plan: Plan, variant: str) -> dict[str, Any]:
    """One variant's row, read from the manifests of its tokenizer, AR model and metric artefacts."""
    tok, ar = plan.tokenizer(variant).require(), plan.ar(variant).require()
    rec = plan.reconstruction(variant).require().metrics
    gen = plan.generation(variant).require().metrics
    probe = plan.probe(variant).require().metrics
    ev = plan.profile.evaluation.evaluator
    probe_on = "prologue" if "prologue" in probe else "first_visual"
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
        "probe_on": probe_on,
        "probe_tokens": plan.profile.tokenizer_for(variant).z_len or plan.profile.tokenizer.z_len,
        "probe_all_visual_top1": probe["all_visual"]["top1"],
        "tokenizer_steps": tok.counts.steps,
        "ar_parameters": ar.counts.parameters,
        "ar_steps": ar.counts.steps,
        "ar_val_ce_visual": ar.metrics["val_ce_visual"],
        "samples_per_guidance": int(gen["cfg"]["samples"]),
        "reference_images": gen["reference_images"],
        "reference_sha256": gen["reference_sha256"][:12],
    }


def _probed(row: dict[str, Any]) -> str:
    n = row["probe_tokens"]
    return f"{n} prologue" if row["probe_on"] == "prologue" else f"first {n} visual"


def markdown(rows: list[dict[str, Any]], ev: str) -> str:
    head = [
        "variant",
        f"rFD-{ev}",
        "PSNR dB",
        f"gFD-{ev} CFG",
        f"gFD-{ev} no CFG",
        f"IS-{ev} CFG",
        f"P / R-{ev} CFG",
        "probe top-1",
        "AR val CE visual",
        "AR params",
        "steps tok / AR",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:

        def pm(key: str, digits: int = 2, r=r) -> str:  # value, with ± std over sampling runs if any
            std = r.get(f"{key}_std")
            return f"{r[key]:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

        cells = [
            r["variant"],
            f"{r[f'rfd_{ev}']:.2f}",
            f"{r['psnr_db']:.2f}",
            pm(f"gfd_{ev}_cfg"),
            pm(f"gfd_{ev}_nocfg"),
            pm(f"is_{ev}_cfg"),
            f"{pm(f'precision_{ev}_cfg', 3)} / {pm(f'recall_{ev}_cfg', 3)}",
            f"{100 * r['probe_top1']:.1f}% ({_probed(r)})",
            f"{r['ar_val_ce_visual']:.3f}",
            f"{r['ar_parameters'] / 1e6:.2f}M",
            f"{r['tokenizer_steps']} / {r['ar_steps']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    r = rows[0]
    lines.append(
        f"\n{r['samples_per_guidance']} samples per guidance setting and variant"
        + (f" in each of {r['sampling_runs']} sampling runs (mean ± sample std)" if r["sampling_runs"] > 1 else "")
        + "; reference: the first "
        f"{r['reference_images']} val images (stats sha256 {r['reference_sha256']}…); evaluator {ev} "
        "(EfficientNet-Lite0 features, not InceptionV3: these are not FID/IS values)."
    )
    return "\n".join(lines) + "\n"


def results_table(plan: Plan, partition: None = None, *, on_log=log.info, progress: bool = False) -> StepResult:
    """The table of every variant of the plan; its key hashes the rows, so new numbers are a new table."""
    rows = [_row(plan, v) for v in plan.profile.variants]
    target = plan.results(rows)
    return cached_or_run(target, lambda: _write(plan, target, rows), on_log)


def _write(plan: Plan, target: Target, rows: list[dict[str, Any]]) -> dict:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    artifact, md = target.artifact, markdown(rows, plan.profile.evaluation.evaluator)
    files = {
        "results.parquet": artifact.put_bytes("results.parquet", buf.getvalue()).__dict__,
        "results.md": artifact.put_bytes("results.md", md.encode()).__dict__,
    }
    return artifact.commit(
        files,
        config={"variants": list(plan.profile.variants)},
        lineage=target.inputs,
        code_version=CODE_VERSIONS[ASSET],
        rows=rows,
        profile=plan.label,
    )


def main(argv: list[str] | None = None) -> int:
    from pipelines.runner import step_main

    return step_main(__doc__, argv, ASSET, partitioned=False, summary=lambda m: f"{len(m.rows)} rows")


if __name__ == "__main__":
    sys.exit(main())


README = Path(__file__).resolve().parents[1] / "README.md"


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
