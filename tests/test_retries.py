"""Retries wired to resumption: a worker that dies mid-run is retried by Dagster and resumes from the store."""

from __future__ import annotations

import threading
import time

import psutil
from dagster import DagsterEventType, DagsterInstance, materialize

from assets.ar import ar_model
from assets.data import WORKER_RETRIES
from pipelines.store import Store
from tests.conftest import UPSTREAM_OF_AR, assert_same_ar_weights, copy_store, tiny_resources


def _kill_worker_after_checkpoint(store_root, part: str, killed: list[int]) -> None:
    """SIGKILL this test's AR worker once its checkpoint `part` is recorded in the store."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if any(store_root.glob(f"ar_model/*/_parts/{part}.json")):
            for proc in psutil.Process().children(recursive=True):
                if "pipelines.workers.ar" in " ".join(proc.cmdline()):
                    proc.kill()
                    killed.append(proc.pid)
            return
        time.sleep(0.02)


def test_a_killed_ar_worker_is_retried_by_dagster_and_reaches_the_uninterrupted_weights(tmp_path, tiny_graph):
    """The tiny AR run (40 steps, checkpoints every 20) materialised through Dagster; its worker is killed
    after the first checkpoint. Dagster retries the step, the worker resumes from that checkpoint, and the
    weights are those of the whole-graph run that was never interrupted (same key, same machine)."""
    copy_store(tiny_graph.root, Store(str(tmp_path)), UPSTREAM_OF_AR)  # upstream there: only the AR runs
    killed: list[int] = []
    killer = threading.Thread(target=_kill_worker_after_checkpoint, args=(tmp_path, "ckpt-0000020", killed))
    killer.start()
    with DagsterInstance.ephemeral() as instance:
        result = materialize([ar_model], partition_key="prologue", resources=tiny_resources(tmp_path),
                             instance=instance, raise_on_error=False)
        killer.join()
        assert killed, "the worker was never killed"
        assert result.success
        types = [e.event_type for e in result.all_events]
        assert types.count(DagsterEventType.STEP_UP_FOR_RETRY) == 1 and DagsterEventType.STEP_RESTARTED in types
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
        assert any("worker failed" in m and f"of {WORKER_RETRIES}" in m for m in logs)
        assert any("resumed from checkpoints/step-0000020" in m for m in logs), "the retry did not resume"

    assert_same_ar_weights(tmp_path, tiny_graph.root, "a kill and a Dagster retry")
