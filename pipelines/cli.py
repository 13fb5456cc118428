"""The command line shared by the per-variant steps that start worker subprocesses.

python -m pipelines.<step> [--profile P] [--variant V ...] [--store URL] [--set FIELD=VALUE ...] [--no-progress]
python -m pipelines.<step> worker --store URL --key KEY [--storage-options JSON] [--no-progress]   (internal)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from pipelines.profiles import load_profile
from pipelines.store import Store


def worker_args(store: Store, key: str, progress: bool) -> list[str]:
    """The arguments a parent step passes to its `worker` subcommand."""
    args = ["worker", "--store", store.url, "--key", key, "--storage-options", json.dumps(store.storage_options)]
    return args + ([] if progress else ["--no-progress"])


def variant_step_main(
    doc: str,
    argv: list[str] | None,
    step: Callable[..., Any],
    worker: Callable[[Store, str, bool], None],
    summary: Callable[[dict], str],
) -> int:
    """Parse the command line; run one worker rank, or the step for each chosen variant."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="(internal) one rank, started by the step itself (or torchrun, deepspeed)")
    w.add_argument("--store", required=True)
    w.add_argument("--key", required=True)
    w.add_argument("--storage-options", default="{}")
    w.add_argument("--no-progress", action="store_true")
    parser.add_argument("--profile", default=os.environ.get("PROLOGUE_PROFILE", "fashion32"))
    parser.add_argument("--variant", action="append", help="variant(s) to run (default: the profile's variants)")
    parser.add_argument("--store", default=None, help="store URL (default: $PROLOGUE_STORE or ./store)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(Store(args.store, json.loads(args.storage_options)), args.key, not args.no_progress)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    profile, store = load_profile(args.profile, args.overrides), Store(args.store)
    for variant in args.variant or profile.variants:
        r = step(profile, variant, store, on_log=print, progress=not args.no_progress)
        done = "(cached)" if r.cached else f"in {r.seconds:.0f}s"
        print(f"{variant}: {summary(r.manifest)} {done} -> {r.artifact.uri}")
    return 0
