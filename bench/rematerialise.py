"""Benchmark: rematerialising the whole graph with nothing changed vs materialising it first, same run.

Workload: the `retrain` job (every asset, both variants, one Dagster run, in process) on the
`tiny` profile into a temp store: shards, two tokenizers, two token datasets, two DeepSpeed AR
models, samples, metrics, probe, results table. The second run finds every cache key in the store
and reuses it; the benchmark checks that every materialisation says so and that no file changed.

    python bench/rematerialise.py [--profile tiny]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dagster import DagsterInstance, PipesSubprocessClient

from assets.definitions import defs
from assets.resources import ProfileResource, StoreResource
from bench.common import machine, save_json


def _run(resources: dict, instance) -> tuple[float, list[bool]]:
    start = time.perf_counter()
    result = defs.resolve_job_def("retrain").execute_in_process(instance=instance, resources=resources)
    seconds = time.perf_counter() - start
    assert result.success, "the retrain run failed"
    reused = [
        all(v.value for k, v in e.materialization.metadata.items() if k.endswith("reused_existing"))
        for e in result.get_asset_materialization_events()
    ]
    return seconds, reused


def _files(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, DagsterInstance.ephemeral() as instance:
        resources = {
            "store": StoreResource(url=tmp),
            "profile": ProfileResource(name=args.profile),
            "pipes_subprocess_client": PipesSubprocessClient(),
        }
        first, reused_first = _run(resources, instance)
        before = _files(Path(tmp))
        cached, reused_again = _run(resources, instance)
        assert _files(Path(tmp)) == before, "the cached run wrote files"
    assert not any(reused_first) and all(reused_again), "reuse flags are not as expected"
    rows = {
        "workload": f"`retrain` job on the {args.profile} profile (whole graph, both variants, "
        f"{len(reused_again)} materialisations), in process",
        "machine": machine(),
        "first_run_s": round(first, 1),
        "cached_run_s": round(cached, 1),
        "speedup": round(first / cached, 1),
    }
    print(f"first run {first:.1f} s, rerun with nothing changed {cached:.1f} s: {first / cached:.1f}x faster, "
          f"every step reused ({rows['workload']}; {rows['machine']})")
    save_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
