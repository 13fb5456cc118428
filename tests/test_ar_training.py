"""Stage 3: DeepSpeed training of the AR model (gloo on CPU), resume, ranks in sync, Dagster Pipes asset."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.loaders import load_ar
from pipelines.profiles import load_profile
from pipelines.store import Store
from pipelines.train_ar import train_ar
from tests.conftest import UPSTREAM_OF_AR, assert_same_ar_weights, copy_store, tiny_plan

ROOT = Path(__file__).resolve().parents[1]


def _seeded(tiny_graph, store: Store, overrides: list[str] | None = None):
    """A plan over `store` holding the tiny store's token datasets (and what they came from)."""
    return tiny_plan(copy_store(tiny_graph.root, store, UPSTREAM_OF_AR), overrides)


def test_tiny_training_learns(store, tiny_graph):
    plan = _seeded(tiny_graph, store)
    r = train_ar(plan, "prologue", progress=False)
    m, codes = r.manifest.metrics, r.manifest.config["model"]
    assert r.manifest.counts.steps == 40 and m["ranks"] == 1
    # the conditional val CE of the EMA weights is far below the uniform distribution's log(codebook)
    assert m["val_ce_visual"] < 0.6 * math.log(codes["visual_codebook"])
    assert m["val_ce_prologue"] < 0.6 * math.log(codes["prologue_codebook"] + 1)
    history = [h["loss"] for h in _history(r.artifact)]
    assert history[-1] < 0.7 * history[0]
    assert r.artifact.verify(checksums=True) == []
    assert m["val_sequences"] == 128
    model = load_ar(r.artifact)
    assert model.num_params() == r.manifest.counts.parameters
    again = train_ar(plan, "prologue", progress=False)
    assert again.cached and again.artifact.key == r.artifact.key
    # the same weights as the whole-graph run trained (through Dagster Pipes): one machine, one config
    shared = json.loads((tiny_graph.root / "ar_model" / r.artifact.key / "_manifest.json").read_text())
    for rel in ("model/ar.safetensors", "model/ar_ema.safetensors"):
        assert r.manifest.files[rel].sha256 == shared["files"][rel]["sha256"], rel


def _history(artifact) -> list[dict]:
    import json

    return [json.loads(line) for line in artifact.read_bytes("history.jsonl").decode().splitlines()]


def test_baseline_variant_has_no_prologue_segment(tmp_path, tiny_graph):
    plan = _seeded(tiny_graph, Store(str(tmp_path)), ["ar_train.steps=10"])
    r = train_ar(plan, "baseline", progress=False)
    assert r.manifest.config["model"]["z_len"] == 0
    assert "val_ce_prologue" not in r.manifest.metrics and r.manifest.metrics["val_ce_visual"] > 0


def test_two_processes_keep_ranks_identical(tmp_path, tiny_graph):
    store = Store(str(tmp_path))
    plan = _seeded(tiny_graph, store, ["ar_train.processes=2", "ar_train.steps=10", "ar_train.checkpoint_every=5"])
    r = train_ar(plan, "prologue", progress=False)
    assert r.manifest.metrics["ranks"] == 2 and r.manifest.metrics["ranks_in_sync"] is True
    # each rank streams its own half of the data: the 2-process run is a different (bigger) batch
    one = train_ar(tiny_plan(store, ["ar_train.steps=10"]), "prologue", progress=False)
    assert one.artifact.key != r.artifact.key


def _cli(store_url: str, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "pipelines.train_ar",
        "--profile",
        "tiny",
        "--store",
        store_url,
        "--variant",
        "prologue",
        "--no-progress",
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def test_kill_and_resume_reaches_the_uninterrupted_weights(tmp_path, tiny_graph):
    """The tiny profile's AR run (40 steps, checkpoints every 20), killed after its first checkpoint and
    resumed, ends with the weights of the uninterrupted whole-graph run (same key, same machine)."""
    copy_store(tiny_graph.root, Store(str(tmp_path / "b")), UPSTREAM_OF_AR)  # upstream there: only the AR runs
    interrupted = _cli(str(tmp_path / "b"))
    assert interrupted.stdout is not None
    for line in interrupted.stdout:
        if "checkpoint checkpoints/step-0000020" in line:
            os.killpg(interrupted.pid, signal.SIGKILL)  # the worker and its launcher, mid-run
            break
    interrupted.wait(timeout=60)
    assert interrupted.returncode != 0
    resumed = _cli(str(tmp_path / "b"))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from checkpoints/step-00000" in out

    assert_same_ar_weights(tmp_path / "b", tiny_graph.root, "kill + resume")


def test_asset_streams_metrics_through_dagster_pipes(tmp_path, tiny_graph):
    from dagster import DagsterInstance, PipesSubprocessClient, materialize

    from assets.ar import ar_model
    from assets.resources import ProfileResource, StoreResource

    copy_store(tiny_graph.root, Store(str(tmp_path)), UPSTREAM_OF_AR)
    resources = {
        "store": StoreResource(url=str(tmp_path)),
        "profile": ProfileResource(name="tiny", overrides=["ar_train.steps=10"]),
        "pipes_subprocess_client": PipesSubprocessClient(),
    }
    with DagsterInstance.ephemeral() as instance:
        result = materialize([ar_model], partition_key="prologue", resources=resources, instance=instance)
        assert result.success
        [mat] = result.get_asset_materialization_events()
        md = {k: v.value for k, v in mat.materialization.metadata.items()}
        assert md["steps"] == 10 and md["val_ce_visual"] > 0
        assert md["metrics_from"] == "pipes"  # the worker's report, which is what it stored
        stored = json.loads(next(tmp_path.glob("ar_model/*/metrics.json")).read_text())
        assert md["val_ce_visual"] == round(stored["val_ce_visual"], 4)
        assert "data:image/png;base64," in md["loss_curves"]
        again = materialize([ar_model], partition_key="prologue", resources=resources, instance=instance)
        [mat] = again.get_asset_materialization_events()
        assert mat.materialization.metadata["metrics_from"].value == "manifest"  # reused: nothing ran
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
        assert any("step 10/10" in msg for msg in logs), "rank-0 metrics did not reach the event log via Pipes"


@pytest.mark.parametrize("field,value", [("ar_train.size", "huge"), ("ar_train.zero_stage", "3")])
def test_bad_ar_config_names_the_field(field, value):
    from modeling.config import ConfigError

    with pytest.raises(ConfigError, match=field.split(".")[1]):
        load_profile("tiny", [f"{field}={value}"])
