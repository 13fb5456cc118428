"""Retries with backoff on transient store errors: the S3 server is stopped in the middle of a real
Dagster run and restarted; the run rides it out. Without retries the same outage fails the run."""

from __future__ import annotations

import threading
import time

import boto3
import pytest
from dagster import DagsterInstance, materialize
from moto.server import ThreadedMotoServer

from assets.data import image_shards
from assets.resources import ProfileResource, StoreResource
from pipelines.launch import free_port

pytestmark = pytest.mark.s3
OUTAGE_S = 6


def _run_through_outage(tmp_path, monkeypatch, attempts: int):
    monkeypatch.setenv("PROLOGUE_S3_ATTEMPTS", str(attempts))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="outage")
    prefix = f"{tmp_path.name}-{attempts}"
    store = StoreResource(url=f"s3://outage/{prefix}", endpoint_url=endpoint, access_key_id="testing",
                          secret_access_key="testing")
    # one process, many small shards: the run is still uploading when the server goes away
    profile = ProfileResource(name="tiny", overrides=["data.workers=1", "data.shard_size=8"])
    outage = {}

    def stop_then_restart():
        nonlocal server
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for the first shard to land, then pull the plug
            listed = s3.list_objects_v2(Bucket="outage", Prefix=f"{prefix}/image_shards/")
            parts = [o["Key"] for o in listed.get("Contents", []) if "/_parts/" in o["Key"]]
            if parts:
                break
            time.sleep(0.05)
        outage["parts_before"] = len(parts)
        server.stop()
        outage["stopped"] = time.time()
        time.sleep(OUTAGE_S)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # same in-memory state
        server.start()
        outage["restarted"] = time.time()

    watcher = threading.Thread(target=stop_then_restart, daemon=True)
    watcher.start()
    try:
        result = materialize([image_shards], resources={"store": store, "profile": profile},
                             instance=DagsterInstance.ephemeral(), raise_on_error=False)
        ended = time.time()
        watcher.join(timeout=OUTAGE_S + 60)
    finally:
        server.stop()
    assert "stopped" in outage and outage["stopped"] < ended, "the outage did not happen during the run"
    assert outage["parts_before"] < 64 + 16  # shards were still to be written when the server stopped
    return result


def test_run_rides_out_an_s3_outage(tmp_path, monkeypatch, fashion_mnist):
    result = _run_through_outage(tmp_path, monkeypatch, attempts=10)
    assert result.success
    [mat] = result.get_asset_materialization_events()
    md = {k: v.value for k, v in mat.materialization.metadata.items()}
    assert md["train_samples"] == 512 and md["val_samples"] == 128
    [check] = result.get_asset_check_evaluations()
    assert check.passed  # every shard re-hashes to its manifest checksum after the outage


def test_without_retries_the_same_outage_fails_the_run(tmp_path, monkeypatch, fashion_mnist):
    result = _run_through_outage(tmp_path, monkeypatch, attempts=1)
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "Could not connect" in failure.step_failure_data.error.to_string()
