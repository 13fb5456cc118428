"""The steps' distributed workers, one module each, started by name (`python -m pipelines.workers.<name>`)
by their step, by torchrun or by the deepspeed launcher. Each reads its spec from the artefact its
parent step created and records its outputs as parts; the parent commits the manifest.

Launched by Dagster Pipes (the assets pass a Pipes runner to the step), rank 0 holds the Pipes
session for the whole run: its log lines (`say`) reach the run's event log, and its final numbers
(`report`, shaped like the manifest fields they become) come back as a custom message from which
the asset builds its metadata. Standalone, lines are printed (the parent streams them) and the
report is a no-op: the parent reads the same numbers from the store. `dagster_pipes` is the Pipes
client package, not Dagster: the layers below `assets/` may use it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from pipelines.store import Artifact, Store


def worker_main(run: Callable[[Store, str, bool], None], argv: list[str] | None = None) -> int:
    """`--store URL --key KEY [--no-progress]`; the store's options come from PROLOGUE_STORE_OPTIONS."""
    parser = argparse.ArgumentParser(description="one rank of a step's worker (started by the step)")
    parser.add_argument("--store", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    store = Store(args.store, json.loads(os.environ.get("PROLOGUE_STORE_OPTIONS", "{}")))
    with pipes_session():
        run(store, args.key, not args.no_progress)
    return 0


@contextlib.contextmanager
def pipes_session() -> Iterator[None]:
    """Rank 0 of a worker launched by Dagster Pipes opens the Pipes session around its whole run (an
    exception is reported through it, then raised); standalone, and on the other ranks, nothing."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if os.environ.get("RANK", "0") != "0" or not PipesEnvVarParamsLoader().is_dagster_pipes_process():
        yield
        return
    with open_dagster_pipes():
        yield


def pipes() -> Any:
    """This process's open Dagster Pipes context, else None."""
    from dagster_pipes import PipesContext

    return PipesContext.get() if PipesContext.is_initialized() else None


def say(message: str) -> None:
    """A worker's log line: printed (standalone, the parent step streams it into its log; under Pipes it
    is the step's captured stdout) and, from the rank holding the Pipes session, sent to the event log."""
    print(message, flush=True)
    if (session := pipes()) is not None:
        session.log.info(message)


def report(artifact: Artifact, numbers: dict[str, Any]) -> None:
    """Rank 0: the worker's final numbers for `artifact` (what it stored, keyed like the manifest fields
    they become) as a Pipes custom message to the asset; standalone, nothing (the parent reads the store)."""
    if (session := pipes()) is not None:
        session.report_custom_message({"asset": artifact.asset, "key": artifact.key, "report": numbers})


def join_ranks(world: int) -> None:
    """Wait until every rank of this worker is done (a gloo group joined here, only for this): the ranks
    of an export or sampling run can finish hours apart (a resumed run may leave one rank nothing to
    do), hence the long timeout."""
    import torch.distributed as dist

    if world == 1:
        return
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    dist.barrier()
    if joined:
        dist.destroy_process_group()
