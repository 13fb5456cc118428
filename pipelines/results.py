"""The results table: one row per variant from the stored artefacts, as Parquet and Markdown.

Every number is read from a materialised artefact (tokenizer, AR model, evaluation metrics), never
typed by hand; metric columns carry their evaluator. Standalone: `python -m pipelines.results`.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.evaluate import _cached, generation_metrics, linear_probe, reconstruction_metrics
from pipelines.profiles import Profile, load_profile
from pipelines.store import StepResult, Store
from pipelines.train_ar import train_ar
from pipelines.train_tokenizer import train_tokenizer

ASSET = "results_table"
CODE_VERSION = "2"
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


def _row(profile: Profile, variant: str, store: Store, on_log) -> tuple[dict[str, Any], dict[str, str]]:
    tok = train_tokenizer(profile, variant, store, on_log=on_log, progress=False)
    ar = train_ar(profile, variant, store, on_log=on_log, progress=False)
    rec = reconstruction_metrics(profile, variant, store, on_log).manifest["metrics"]
    gen = generation_metrics(profile, variant, store, on_log).manifest["metrics"]
    probe = linear_probe(profile, variant, store, on_log).manifest["metrics"]
    ev = profile.evaluation.evaluator
    probe_on = "prologue" if "prologue" in probe else "first_visual"
    spread = {}  # sample std over sampling runs, when there are several
    if "over_seeds" in gen:
        spread = {f"{name}_std": gen["over_seeds"][g][key]["std"] for name, g, key in _generation_columns(ev)}
        gen = {g: {k: v["mean"] for k, v in gen["over_seeds"][g].items()} for g in ("cfg", "nocfg")} | {
            k: v for k, v in gen.items() if k not in ("cfg", "nocfg")
        }
    row = {
        "variant": variant,
        f"rfd_{ev}": rec[f"rfd_{ev}"],
        "psnr_db": rec["psnr_db"],
        **{name: gen[g][key] for name, g, key in _generation_columns(ev)},
        **spread,
        "sampling_runs": len(gen.get("seeds", [0])),
        **(
            {
                "rfid_inception": rec["rfid_inception"],
                "gfid_inception_cfg": gen["cfg"]["fid_inception"],
                "gfid_inception_nocfg": gen["nocfg"]["fid_inception"],
                "is_inception_cfg": gen["cfg"]["is_inception_mean"],
            }
            if "rfid_inception" in rec
            else {}
        ),
        "probe_top1": probe[probe_on]["top1"],
        "probe_on": probe_on,
        "probe_tokens": profile.tokenizer_for(variant).z_len or profile.tokenizer.z_len,
        "probe_all_visual_top1": probe["all_visual"]["top1"],
        "tokenizer_steps": tok.manifest["counts"]["steps"],
        "ar_parameters": ar.manifest["counts"]["parameters"],
        "ar_steps": ar.manifest["counts"]["steps"],
        "ar_val_ce_visual": ar.manifest["metrics"]["val_ce_visual"],
        "samples_per_guidance": int(gen["cfg"]["samples"]),
        "reference_images": gen["reference_images"],
        "reference_sha256": gen["reference_sha256"][:12],
    }
    return row, {"tokenizer": tok.artifact.key, "ar_model": ar.artifact.key}


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


def results_table(profile: Profile, store: Store, *, on_log=log.info) -> StepResult:
    start = time.perf_counter()
    variants = profile.variants
    built = [_row(profile, v, store, on_log) for v in variants]
    rows = [r for r, _ in built]
    inputs = {f"{k}/{v}": key for (_, keys), v in zip(built, variants, strict=True) for k, key in keys.items()}
    ev = profile.evaluation.evaluator
    config = {"rows": rows}  # the numbers themselves: a changed metric is a new table
    artifact, manifest = _cached(store, ASSET, config, inputs, on_log)
    if manifest is not None:
        return StepResult(artifact, manifest, True, time.perf_counter() - start)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    md = markdown(rows, ev)
    files = {
        "results.parquet": artifact.put_bytes("results.parquet", buf.getvalue()).__dict__,
        "results.md": artifact.put_bytes("results.md", md.encode()).__dict__,
    }
    manifest = artifact.commit(
        files,
        config={"variants": list(variants)},
        lineage=inputs,
        code_version=CODE_VERSION,
        rows=rows,
        profile=f"{profile.name}@{profile.version}",
    )
    return StepResult(artifact, manifest, False, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("PROLOGUE_PROFILE", "fashion32"))
    parser.add_argument("--store", default=None, help="store URL (default: $PROLOGUE_STORE or ./store)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    r = results_table(load_profile(args.profile, args.overrides), Store(args.store), on_log=print)
    print(r.artifact.read_bytes("results.md").decode())
    print(f"-> {r.artifact.uri}")
    return 0


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
