"""The image_shards asset through real Dagster runs: in-process, the CLI, and the webserver (GraphQL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize
from dagster._core.definitions.observe import observe  # no public equivalent for tests yet

from assets.data import data_version, image_shards, raw_images
from assets.definitions import defs
from assets.resources import ProfileResource, ProfileSettings, StoreResource

ROOT = Path(__file__).resolve().parents[1]


def _metadata(result) -> dict:
    [mat] = result.get_asset_materialization_events()
    return {k: v.value for k, v in mat.materialization.metadata.items()}


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_materialise_both_splits_then_reuse(backend, tmp_path, fashion_mnist, request):
    if backend == "local":
        store = StoreResource(url=str(tmp_path / "store"))
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        store = StoreResource(url=f"s3://prologue-test/assets-{tmp_path.name}", endpoint_url=endpoint,
                              access_key_id="testing", secret_access_key="testing")
    resources = {"store": store, "profile": ProfileResource(name="tiny")}
    with DagsterInstance.ephemeral() as instance:
        result = materialize([image_shards], resources=resources, instance=instance)
        assert result.success
        md = _metadata(result)
        for split, n in [("train", 512), ("val", 128)]:
            assert md[f"{split}_samples"] == n and md[f"{split}_corrupt_skipped"] == 0
            assert md[f"{split}_reused_existing"] is False
            assert md[f"{split}_preview"].startswith("![") and "data:image/png;base64," in md[f"{split}_preview"]
        assert md["profile"] == "tiny@2" and md["train_cache_key"] != md["val_cache_key"]
        [check] = result.get_asset_check_evaluations()
        assert check.check_name == "shards_intact" and check.passed
        again = _metadata(materialize([image_shards], resources=resources, instance=instance))
        assert again["train_reused_existing"] is True and again["val_reused_existing"] is True
        assert again["train_cache_key"] == md["train_cache_key"]
        event = instance.get_latest_materialization_event(image_shards.key)
        # the data version is derived from the two splits' cache keys alone
        version = data_version({"train": md["train_cache_key"], "val": md["val_cache_key"]}).value
        assert event.asset_materialization.tags["dagster/data_version"] == version
    manifest_uri = f"{md['val_uri']}/_manifest.json"
    manifest = json.loads(store.store().open_url(manifest_uri).read())
    assert manifest["counts"]["samples"] == 128


def test_shards_check_fails_on_a_damaged_shard(tmp_path, fashion_mnist):
    resources = {"store": StoreResource(url=str(tmp_path / "store")), "profile": ProfileResource(name="tiny")}
    with DagsterInstance.ephemeral() as instance:
        md = _metadata(materialize([image_shards], resources=resources, instance=instance))
        shard = sorted(Path(md["val_uri"]).rglob("*.tar"))[0]
        # the shards are reused, so the inline check is the cheap one: sizes (a flipped bit is the
        # integrity job's to find: tests/test_checks.py)
        shard.write_bytes(shard.read_bytes()[:-512])
        result = materialize([image_shards], resources=resources, instance=instance, raise_on_error=False)
        [check] = result.get_asset_check_evaluations()
        assert not check.passed
        problems = check.metadata["problems"].value
        assert list(problems) == ["val"] and "truncated" in problems["val"][0] and shard.name in problems["val"][0]


def test_raw_images_observation_tracks_new_data(photo_folder):
    root, n = photo_folder
    (root / "train").symlink_to(root / "val", target_is_directory=True)
    profile = ProfileResource(overrides=[f"data.{s}.kind=folder" for s in ("train", "val")]
                              + [f"data.{s}.url={root}" for s in ("train", "val")] + ["data.resize=center_crop"])

    def version_and_count():
        result = observe([raw_images], resources={"profile": profile}, instance=DagsterInstance.ephemeral())
        [event] = result.get_asset_observation_events()
        obs = event.asset_observation_data.asset_observation
        return obs.data_version, obs.metadata["val_images"].value

    v1, count = version_and_count()
    assert count == n + 1 and v1 == version_and_count()[0]
    (root / "val" / "n00000002" / "new.png").write_bytes((root / "val" / "n00000001" / "broken.JPEG").read_bytes())
    v2, count = version_and_count()
    assert count == n + 2 and v2 != v1


def test_bad_profile_fails_before_work_naming_the_field(tmp_path):
    resources = {"store": StoreResource(url=str(tmp_path)), "profile": ProfileResource(name="tiny",
                                                                                          overrides=["data.shard_sise=3"])}
    result = materialize([image_shards], resources=resources, raise_on_error=False,
                         instance=DagsterInstance.ephemeral())
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "data.shard_sise: unknown field" in failure.step_failure_data.error.to_string()
    assert not any(tmp_path.iterdir())  # nothing written


def test_typed_settings_override_only_what_they_change():
    """The Launchpad's typed settings: a changed field overrides the profile, an unchanged one does not (so
    a run on another profile keeps that profile's values), and `overrides` apply after them."""
    settings = ProfileSettings.model_validate({"tokenizer_train": {"steps": 7}, "data": {"shard_size": 100}})
    profile = ProfileResource(name="tiny", settings=settings, overrides=["data.shard_size=64"]).profile()
    tiny = ProfileResource(name="tiny").profile()
    assert profile.tokenizer_train.steps == 7 and profile.data.shard_size == 64
    assert profile.tokenizer_train.batch_size == tiny.tokenizer_train.batch_size != 32  # tiny's, not the default
    assert profile.data.train.limit == tiny.data.train.limit == 512


def test_typed_settings_carry_the_profile_docstrings_and_values():
    steps = ProfileSettings.model_fields["tokenizer_train"].annotation.model_fields["steps"]
    assert steps.annotation is int and steps.default == ProfileResource().profile().tokenizer_train.steps
    assert steps.description.startswith("Optimiser steps")
    assert "variants" not in ProfileSettings.model_fields  # the partitions are the code location's


def test_a_wrong_typed_setting_value_fails_at_run_start_naming_the_field(tmp_path):
    settings = ProfileSettings.model_validate({"data": {"shard_size": 0}})
    resources = {"store": StoreResource(url=str(tmp_path)), "profile": ProfileResource(name="tiny", settings=settings)}
    result = materialize([image_shards], resources=resources, raise_on_error=False,
                         instance=DagsterInstance.ephemeral())
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "data.shard_size: must be >= 1" in failure.step_failure_data.error.to_string()
    assert not any(tmp_path.iterdir())  # nothing written


def _env(tmp_path: Path) -> dict:
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    # runs launched from the UI start at once (no queue, so no daemon needed)
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\n"
        "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: DefaultRunCoordinator\n"
    )
    return {**os.environ, "DAGSTER_HOME": str(home), "PROLOGUE_PROFILE": "tiny",
            "PROLOGUE_STORE": str(tmp_path / "store")}


def test_cli_asset_materialize(tmp_path, fashion_mnist):
    env = _env(tmp_path)
    cmd = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "assets.definitions",
           "--select", "image_shards"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    manifests = (tmp_path / "store" / "image_shards").glob("*/_manifest.json")
    assert sorted(json.loads(m.read_text())["counts"]["samples"] for m in manifests) == [128, 512]
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        event = instance.get_latest_materialization_event(image_shards.key)
        assert event is not None and event.asset_materialization.metadata["val_samples"].value == 128


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    """`dagster-webserver` on 127.0.0.1 with a temp DAGSTER_HOME and the tiny profile, shared by this
    module's UI tests; stopped by PID."""
    from pipelines.launch import free_port

    tmp_path = tmp_path_factory.mktemp("webserver")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1",
           "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_webserver_serves_the_asset_graph(webserver):
    data = _graphql(webserver, "{ assetNodes { assetKey { path } groupName isPartitioned } }")
    nodes = {tuple(n["assetKey"]["path"]): n for n in data["data"]["assetNodes"]}
    assert nodes[("image_shards",)]["groupName"] == "data" and not nodes[("image_shards",)]["isPartitioned"]
    assert nodes[("tokenizer",)]["isPartitioned"]
    assert set(nodes) == {tuple(k.path) for k in defs.resolve_asset_graph().get_all_asset_keys()}


def test_ui_launches_a_materialisation_and_reads_its_metadata(webserver, fashion_mnist):
    repos = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
    [node] = _graphql(webserver, repos)["data"]["repositoriesOrError"]["nodes"]
    params = {
        "selector": {"repositoryLocationName": node["location"]["name"], "repositoryName": node["name"],
                     "jobName": "shard_images"},
    }
    launch = _graphql(webserver, """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
        __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""", {"p": params})
    result = launch["data"]["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    run_id = result["run"]["runId"]
    deadline = time.time() + 180
    while True:
        status = _graphql(webserver, "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }",
                          {"id": run_id})
        status = status["data"]["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        assert time.time() < deadline, f"run still {status}"
        time.sleep(1)
    assert status == "SUCCESS"
    mats = _graphql(webserver, """{ assetOrError(assetKey: {path: ["image_shards"]}) { ... on Asset {
        assetMaterializations { runId metadataEntries { label
          ... on IntMetadataEntry { intValue } ... on TextMetadataEntry { text } } } } } }""")
    [mat] = mats["data"]["assetOrError"]["assetMaterializations"]
    md = {e["label"]: e.get("intValue", e.get("text")) for e in mat["metadataEntries"]}
    assert mat["runId"] == run_id
    assert md["train_samples"] == 512 and md["val_samples"] == 128 and md["val_cache_key"]


def _job_selector(port: int, job: str) -> dict:
    repos = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
    [node] = _graphql(port, repos)["data"]["repositoriesOrError"]["nodes"]
    return {"repositoryLocationName": node["location"]["name"], "repositoryName": node["name"], "pipelineName": job}


def test_launchpad_shows_typed_settings_and_rejects_a_wrong_one_before_the_run(webserver):
    selector = _job_selector(webserver, "train_tokenizers")
    schema = _graphql(webserver, """query($s: PipelineSelector!) { runConfigSchemaOrError(selector: $s) {
        ... on RunConfigSchema { allConfigTypes { key ... on CompositeConfigType {
          fields { name description defaultValueAsJson isRequired } } } } } }""", {"s": selector})
    types = schema["data"]["runConfigSchemaOrError"]["allConfigTypes"]
    fields = {f["name"]: f for t in types for f in t.get("fields") or [] if t["key"].startswith("Shape")}
    steps = [f for t in types for f in t.get("fields") or [] if f["name"] == "steps"
             and "Optimiser steps (each: one encoder/decoder step" in (f["description"] or "")]
    assert steps and json.loads(steps[0]["defaultValueAsJson"]) == 30  # the tiny profile's, shown as default
    assert not steps[0]["isRequired"] and "settings" in fields

    def check(config: dict) -> dict:
        run_config = {"resources": {"profile": {"config": {"settings": config}}}}
        return _graphql(webserver, """query($s: PipelineSelector!, $c: RunConfigData!) {
            isPipelineConfigValid(pipeline: $s, runConfigData: $c, mode: "default") { __typename
              ... on RunConfigValidationInvalid { errors { message } } } }""",
                        {"s": selector, "c": run_config})["data"]["isPipelineConfigValid"]

    assert check({"tokenizer_train": {"steps": 5}})["__typename"] == "PipelineConfigValidationValid"
    typo = check({"tokenizer_train": {"stepz": 5}})
    assert typo["__typename"] == "RunConfigValidationInvalid" and '"stepz"' in typo["errors"][0]["message"]
    wrong_type = check({"tokenizer_train": {"steps": "ten"}})
    assert wrong_type["__typename"] == "RunConfigValidationInvalid" and "steps" in wrong_type["errors"][0]["message"]
    # launching it creates no run
    params = {"selector": {**selector, "jobName": selector["pipelineName"]},
              "runConfigData": {"resources": {"profile": {"config": {"settings": {"tokenizer_train": {"stepz": 5}}}}}}}
    del params["selector"]["pipelineName"]
    launch = _graphql(webserver, """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
        __typename } }""", {"p": params})
    assert launch["data"]["launchRun"]["__typename"] == "RunConfigValidationInvalid"
    runs = _graphql(webserver, '{ runsOrError(filter: {pipelineName: "train_tokenizers"}) { ... on Runs { count } } }')
    assert runs["data"]["runsOrError"]["count"] == 0


def test_the_dg_project_checks_and_launches(tmp_path, fashion_mnist):
    """`dg check defs` loads the code location; `dg launch --assets image_shards` materialises it (tiny
    profile, a temporary store and instance)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    dg = Path(sys.executable).parent / "dg"
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PROLOGUE_PROFILE": "tiny", "PROLOGUE_STORE": str(tmp_path / "s")}
    check = subprocess.run([str(dg), "check", "defs"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "All definitions loaded successfully" in check.stdout + check.stderr, check.stderr
    launch = subprocess.run([str(dg), "launch", "--assets", "image_shards"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert launch.returncode == 0, launch.stderr[-2000:]
    manifests = sorted((tmp_path / "s" / "image_shards").glob("*/_manifest.json"))
    assert len(manifests) == 2  # train and val


def test_worker_assets_metadata_comes_through_dagster_pipes(tiny_copy):
    """tokenizer, token_dataset and samples launch their workers through Dagster Pipes: rank 0's lines reach
    the event log, and the metadata is built from the worker's report (`metrics_from: pipes`), equal to what
    it stored; a rerun reuses the artefacts and builds the same metadata from the manifests."""
    import shutil

    from assets.ar import ar_model
    from assets.evaluation import samples, sampling_tuning
    from assets.tokenizer import tokenizer
    from assets.tokens import token_dataset
    from pipelines.tuning import KNOBS
    from tests.conftest import tiny_plan, tiny_resources

    plan, variant = tiny_plan(tiny_copy), "prologue"
    redo = [plan.tokenizer(variant), plan.tokens(variant), *plan.samples(variant)]
    for target in redo:  # made again, here, by their workers (ar_model and sampling_tuning stay)
        shutil.rmtree(f"{tiny_copy.root}/{target.asset}/{target.key}")
    # ar_model and sampling_tuning (reused) put samples after token_dataset in the run
    assets = [tokenizer, token_dataset, ar_model, sampling_tuning, samples]
    resources = tiny_resources(tiny_copy.root)

    def metadata(result) -> dict[str, dict]:
        return {e.asset_key.path[-1]: {k: v.value for k, v in e.materialization.metadata.items()}
                for e in result.get_asset_materialization_events()}  # fmt: skip

    with DagsterInstance.ephemeral() as instance:
        result = materialize(assets, partition_key=variant, resources=resources, instance=instance)
        md = metadata(result)
        from_ = {a: m.get("metrics_from") for a, m in md.items()}
        assert from_ == {**dict.fromkeys(("tokenizer", "token_dataset", "samples"), "pipes"),
                         "ar_model": "manifest", "sampling_tuning": None}  # fmt: skip
        logs = [e.user_message for e in instance.all_logs(result.run_id)]
        for line in ("step 30/30", "val PSNR", "val rows", "samples with guidance"):  # one per worker at least
            assert any(line in msg for msg in logs), f"{line!r} did not reach the event log through Pipes"
        again = metadata(materialize(assets, partition_key=variant, resources=resources, instance=instance))
    tok, tokens, smp = (t.artifact.manifest() for t in redo[:3])
    stored = {
        "tokenizer": {"steps": tok["counts"]["steps"], "val_psnr_db": round(tok["metrics"]["psnr_db"], 3),
                      "val_images": tok["metrics"]["images"], "ranks": tok["metrics"]["ranks"],
                      "prologue_codes_used": round(tok["metrics"]["prologue_codes"]["fraction_used"], 4)},
        "token_dataset": {"train_rows": tokens["counts"]["rows"]["train"], "tokens": tokens["counts"]["tokens"],
                          "bytes_per_token_wds": tokens["counts"]["bytes_per_token"]["wds"]},
        "samples": {"samples_cfg": smp["counts"]["samples"]["cfg"], "samples_nocfg": smp["counts"]["samples"]["nocfg"],
                    "sampler_cfg": {k: smp["samplers"]["cfg"][k] for k in KNOBS}},
    }  # fmt: skip
    assert tok["metrics"] == redo[0].artifact.read_json("metrics.json")
    for asset, fields in stored.items():
        assert {k: md[asset][k] for k in fields} == fields, asset
        assert again[asset]["metrics_from"] == "manifest" and again[asset]["reused_existing"] is True
        moving = ("metrics_from", "reused_existing", "seconds")
        assert {k: v for k, v in again[asset].items() if k not in moving} == {
            k: v for k, v in md[asset].items() if k not in moving
        }, asset
