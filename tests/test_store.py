"""Object store semantics, run against a local folder and the S3 server alike."""

import json
import os
import subprocess
import sys

import pytest

from pipelines.store import MANIFEST, Store, cache_key, machine_label


def test_cache_key_is_content_addressed():
    k = cache_key("a", "1", {"x": 1, "y": [1, 2]}, {"up": "abc"})
    assert k == cache_key("a", "1", {"y": [1, 2], "x": 1}, {"up": "abc"})  # key order does not matter
    assert len(k) == 24
    assert k != cache_key("a", "2", {"x": 1, "y": [1, 2]}, {"up": "abc"})  # code version
    assert k != cache_key("a", "1", {"x": 2, "y": [1, 2]}, {"up": "abc"})  # config
    assert k != cache_key("a", "1", {"x": 1, "y": [1, 2]}, {"up": "abd"})  # input
    assert k != cache_key("b", "1", {"x": 1, "y": [1, 2]}, {"up": "abc"})  # asset


def test_commit_writes_manifest_last(store: Store, tmp_path):
    art = store.artifact("thing", "k1")
    assert art.manifest() is None
    local = tmp_path / "blob.bin"
    local.write_bytes(b"x" * 1000)
    files = {"data/blob.bin": art.put_file(local, "data/blob.bin"), "meta.json": art.put_bytes("meta.json", b"{}")}
    # data present but no manifest: not materialised
    assert art.manifest() is None
    assert art.verify() == [f"{art.uri}: no {MANIFEST} (not materialised or interrupted)"]
    m = art.commit(files, counts={"n": 1}, config={"a": 1}, lineage={"up": "k0"})
    again = store.artifact("thing", "k1").manifest()
    assert again == json.loads(json.dumps(m))
    assert again["files"]["data/blob.bin"]["size"] == 1000
    assert again["counts"] == {"n": 1} and again["lineage"] == {"up": "k0"}
    assert art.verify(checksums=True) == []
    assert art.read_bytes("data/blob.bin") == b"x" * 1000


def test_commit_records_the_wall_and_cpu_time_of_the_step_and_its_workers(store: Store):
    import torch  # noqa: F401  (machine() records torch's fields once a step has imported it)

    art = store.artifact("thing", "timed")
    art.begin()
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    subprocess.run([sys.executable, "-c", busy], check=True)  # a worker's CPU time counts once it exits
    timing = art.commit({})["timing"]
    assert timing["cpu_s"] >= 0.6 and timing["wall_s"] >= 0.6
    # and the machine that measured it (torch imported in this process: its version and threads too)
    assert timing["machine"]["logical_cores"] == os.cpu_count() and timing["machine"]["cpu"]
    assert timing["machine"]["torch_threads"] >= 1 and machine_label(timing["machine"]).count(" cores, torch ") == 1
    assert "timing" not in store.artifact("thing", "untimed").commit({})  # no step began it: nothing measured


def test_verify_detects_truncated_and_missing_files(store: Store, tmp_path):
    art = store.artifact("thing", "k2")
    local = tmp_path / "a.bin"
    local.write_bytes(b"abcdef" * 100)
    files = {"a.bin": art.put_file(local, "a.bin"), "b.bin": art.put_bytes("b.bin", b"hello")}
    art.commit(files)
    store.fs.pipe_file(art.file_path("a.bin"), b"abc")  # truncate behind the manifest's back
    store.fs.rm(art.file_path("b.bin"))
    problems = art.verify()
    assert any("a.bin: 3 bytes, manifest says 600" in p for p in problems)
    assert "b.bin: missing" in problems


def test_parts_survive_for_resume_only_when_intact(store: Store, tmp_path):
    art = store.artifact("thing", "k3")
    for i in range(3):
        local = tmp_path / f"p{i}.bin"
        local.write_bytes(bytes([i]) * (10 + i))
        rec = art.put_file(local, f"shards/p{i}.bin")
        art.record_part(f"p{i}", {"files": {f"shards/p{i}.bin": rec.__dict__}, "samples": i})
    store.fs.pipe_file(art.file_path("shards/p1.bin"), b"\0")  # damaged after its record
    done = store.artifact("thing", "k3").parts()
    assert sorted(done) == ["p0", "p2"]
    assert done["p2"]["samples"] == 2


def test_commit_trained_takes_the_workers_final_part(store: Store):
    art = store.artifact("thing", "k4")
    with pytest.raises(RuntimeError, match="exited without its final outputs"):
        art.commit_trained({})  # the worker died before recording it
    assert art.manifest() is None
    weights = art.put_bytes("weights.bin", b"w" * 8)
    art.record_part(
        "final", {"files": {"weights.bin": weights.__dict__}, "steps": 7, "metrics": {"l": 0.5}, "checkpoints": []}
    )
    spec = art.put_bytes("spec.json", b"{}")
    m = art.commit_trained({"spec.json": spec}, config={"a": 1})
    assert sorted(m["files"]) == ["spec.json", "weights.bin"]
    assert m["counts"] == {"steps": 7} and m["metrics"] == {"l": 0.5} and m["config"] == {"a": 1}
    assert art.verify(checksums=True) == []


def test_store_pickles_to_the_same_location(store: Store):
    import pickle

    other = pickle.loads(pickle.dumps(store))
    store.artifact("x", "y").put_bytes("f.txt", b"data")
    assert other.artifact("x", "y").read_bytes("f.txt") == b"data"
    assert other.url == store.url


def test_store_url_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PROLOGUE_STORE", str(tmp_path / "envstore"))
    s = Store()
    assert s.url == str(tmp_path / "envstore") and s.is_local
    assert (tmp_path / "envstore").is_dir()


def test_s3_store_takes_endpoint_from_aws_environment(s3_endpoint, monkeypatch):
    monkeypatch.setenv("PROLOGUE_STORE", "s3://prologue-test/from-env")
    s = Store()  # endpoint from AWS_ENDPOINT_URL, credentials from AWS_* variables
    assert not s.is_local
    s.artifact("a", "b").put_bytes("x.txt", b"1")
    assert s.uri(s.artifact("a", "b").file_path("x.txt")) == "s3://prologue-test/from-env/a/b/x.txt"
    assert s.open_url("s3://prologue-test/from-env/a/b/x.txt").read() == b"1"
