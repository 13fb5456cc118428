"""The results table: one row per variant from the stored artefacts, as Parquet and Markdown.

Every number is read from a materialised artefact (tokenizer, AR model, evaluation metrics), never
typed by hand; metric columns carry their evaluator. Standalone: `python -m pipelines.results`.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.evaluate import _cached, generation_metrics, linear_probe, reconstruction_metrics
from pipelines.profiles import VARIANTS, Profile, load_profile
from pipelines.store import StepResult, Store
from pipelines.train_ar import train_ar
from pipelines.train_tokenizer import train_tokenizer

ASSET = "results_table"
CODE_VERSION = "1"
log = logging.getLogger(__name__)


def _row(profile: Profile, variant: str, store: Store, on_log) -> tuple[dict[str, Any], dict[str, str]]:
    tok = train_tokenizer(profile, variant, store, on_log=on_log, progress=False)
    ar = train_ar(profile, variant, store, on_log=on_log, progress=False)
    rec = reconstruction_metrics(profile, variant, store, on_log).manifest["metrics"]
    gen = generation_metrics(profile, variant, store, on_log).manifest["metrics"]
    probe = linear_probe(profile, variant, store, on_log).manifest["metrics"]
    ev = profile.evaluation.evaluator
    probe_on = "prologue" if "prologue" in probe else "first_visual"
    row = {
        "variant": variant,
        f"rfd_{ev}": rec[f"rfd_{ev}"],
        "psnr_db": rec["psnr_db"],
        f"gfd_{ev}_cfg": gen["cfg"][f"fd_{ev}"],
        f"gfd_{ev}_nocfg": gen["nocfg"][f"fd_{ev}"],
        f"is_{ev}_cfg": gen["cfg"][f"is_{ev}_mean"],
        f"is_{ev}_nocfg": gen["nocfg"][f"is_{ev}_mean"],
        f"precision_{ev}_cfg": gen["cfg"][f"precision_{ev}"],
        f"recall_{ev}_cfg": gen["cfg"][f"recall_{ev}"],
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
        "probe_tokens": f"{probe_on} ({profile.tokenizer.z_len} tokens)",
        "probe_all_visual_top1": probe["all_visual"]["top1"],
        "tokenizer_steps": tok.manifest["counts"]["steps"],
        "ar_parameters": ar.manifest["counts"]["parameters"],
        "ar_steps": ar.manifest["counts"]["steps"],
        "ar_val_ce_visual": ar.manifest["metrics"]["val_ce_visual"],
        "samples_per_guidance": gen["cfg"]["samples"],
        "reference_images": gen["reference_images"],
        "reference_sha256": gen["reference_sha256"][:12],
    }
    return row, {"tokenizer": tok.artifact.key, "ar_model": ar.artifact.key}


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
        "AR params",
        "steps tok / AR",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"],
            f"{r[f'rfd_{ev}']:.2f}",
            f"{r['psnr_db']:.2f}",
            f"{r[f'gfd_{ev}_cfg']:.2f}",
            f"{r[f'gfd_{ev}_nocfg']:.2f}",
            f"{r[f'is_{ev}_cfg']:.2f}",
            f"{r[f'precision_{ev}_cfg']:.3f} / {r[f'recall_{ev}_cfg']:.3f}",
            f"{100 * r['probe_top1']:.1f}% ({r['probe_tokens']})",
            f"{r['ar_parameters'] / 1e6:.2f}M",
            f"{r['tokenizer_steps']} / {r['ar_steps']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    r = rows[0]
    lines.append(
        f"\n{r['samples_per_guidance']} samples per guidance setting and variant; reference: the first "
        f"{r['reference_images']} val images (stats sha256 {r['reference_sha256']}…); evaluator {ev} "
        "(EfficientNet-Lite0 features, not InceptionV3: these are not FID/IS values)."
    )
    return "\n".join(lines) + "\n"


def results_table(profile: Profile, store: Store, *, on_log=log.info) -> StepResult:
    start = time.perf_counter()
    built = [_row(profile, v, store, on_log) for v in VARIANTS]
    rows = [r for r, _ in built]
    inputs = {f"{k}/{v}": key for (_, keys), v in zip(built, VARIANTS, strict=True) for k, key in keys.items()}
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
        config={"variants": list(VARIANTS)},
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
