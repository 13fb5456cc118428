"""The steps' distributed workers, one module each, started by name (`python -m pipelines.workers.<name>`)
by their step, by torchrun or by the deepspeed launcher. Each reads its spec from the artefact its
parent step created and records its outputs as parts; the parent commits the manifest."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

from pipelines.store import Store


def worker_main(run: Callable[[Store, str, bool], None], argv: list[str] | None = None) -> int:
    """`--store URL --key KEY [--no-progress]`; the store's options come from PROLOGUE_STORE_OPTIONS."""
    parser = argparse.ArgumentParser(description="one rank of a step's worker (started by the step)")
    parser.add_argument("--store", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    run(Store(args.store, json.loads(os.environ.get("PROLOGUE_STORE_OPTIONS", "{}"))), args.key, not args.no_progress)
    return 0
