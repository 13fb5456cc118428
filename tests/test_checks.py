"""Every asset check fails on the damage it guards against (on a copy of the tiny store, where every
artefact is already materialised, so the assets only re-check). On a reused artefact the blocking
checks are the cheap form (manifest, file sizes); the `integrity` job's checks read the bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dagster import DagsterInstance, materialize
from safetensors.torch import load, save

from tests.conftest import tiny_plan, tiny_resources


def _check(assets, store, check: str, partition: str = "prologue"):
    result = materialize(assets, partition_key=partition, resources=tiny_resources(store.root),
                         instance=DagsterInstance.ephemeral(), raise_on_error=False)  # fmt: skip
    [evaluation] = [c for c in result.get_asset_check_evaluations() if c.check_name == check]
    return evaluation


def _integrity(store, check: str):
    """One check's evaluation from a run of the `integrity` job (every check, every partition)."""
    from assets.definitions import defs

    result = defs.resolve_job_def("integrity").execute_in_process(
        instance=DagsterInstance.ephemeral(), resources=tiny_resources(store.root), raise_on_error=False
    )
    [evaluation] = [c for c in result.get_asset_check_evaluations() if c.check_name == check]
    return evaluation


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _poison(path: Path) -> None:
    """One NaN in the first floating-point tensor of a safetensors file (same shapes, same size)."""
    tensors = load(path.read_bytes())
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    path.write_bytes(save(tensors))


@pytest.mark.parametrize("asset_name,weights", [("tokenizer", "model/tokenizer.safetensors"),
                                                ("ar_model", "model/ar_ema.safetensors")])  # fmt: skip
def test_weights_finite_fails_on_a_nan(tiny_copy, asset_name, weights):
    from assets.ar import ar_model
    from assets.tokenizer import tokenizer

    asset = {"tokenizer": tokenizer, "ar_model": ar_model}[asset_name]
    plan = tiny_plan(tiny_copy)
    target = plan.tokenizer("prologue") if asset_name == "tokenizer" else plan.ar("prologue")
    scan = f"{asset_name.removesuffix('_model')}_weights_scan"
    assert _check([asset], tiny_copy, "weights_finite").passed and _integrity(tiny_copy, scan).passed
    path = Path(target.artifact.file_path(weights))
    _poison(path)
    assert _check([asset], tiny_copy, "weights_finite").passed  # reused: the cheap check reads no weights
    failed = _integrity(tiny_copy, scan)
    assert not failed.passed
    [problem] = failed.metadata["problems"].value["prologue"]
    assert weights in problem and "1 NaN/Inf values" in problem
    _truncate(path)  # what the cheap check does see
    [problem] = _check([asset], tiny_copy, "weights_finite").metadata["problems"].value["prologue"]
    assert problem.startswith(f"{weights}: ") and "truncated" in problem


def test_tokens_intact_fails_on_a_tampered_token_file(tiny_copy):
    from assets.tokens import token_dataset

    art = tiny_plan(tiny_copy).tokens("prologue").artifact
    rel = "wds/val-000000.tar"
    path = Path(art.file_path(rel))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size: only the checksum sees it
    path.write_bytes(bytes(data))
    assert _check([token_dataset], tiny_copy, "tokens_intact").passed  # reused: sizes only
    failed = _integrity(tiny_copy, "tokens_rehash")
    assert not failed.passed
    assert failed.metadata["problems"].value["prologue"] == [f"{rel}: sha256 differs from the manifest"]
    _truncate(path)
    failed = _check([token_dataset], tiny_copy, "tokens_intact")
    assert not failed.passed and "truncated" in failed.metadata["problems"].value["prologue"][0]


def test_shards_rehash_sees_a_flipped_bit_the_cheap_check_does_not(tiny_copy):
    from assets.data import image_shards

    art = tiny_plan(tiny_copy).shards("val").artifact
    rel = next(r for r in json.loads(Path(art.file_path("_manifest.json")).read_text())["files"] if r.endswith(".tar"))
    path = Path(art.file_path(rel))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = materialize([image_shards], resources=tiny_resources(tiny_copy.root), instance=DagsterInstance.ephemeral(),
                         raise_on_error=False)  # fmt: skip
    [inline] = [c for c in result.get_asset_check_evaluations() if c.check_name == "shards_intact"]
    assert inline.passed
    failed = _integrity(tiny_copy, "shards_rehash")
    assert not failed.passed
    assert failed.metadata["problems"].value["val"] == [f"{rel}: sha256 differs from the manifest"]


def test_reference_checksum_fails_on_a_changed_reference_file(tiny_copy):
    from assets.evaluation import generation_metrics

    ref = tiny_plan(tiny_copy).reference("effnetlite0").artifact
    path = Path(ref.file_path("stats.npz"))
    assert _check([generation_metrics], tiny_copy, "reference_checksum").passed
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # other statistics under the same name
    failed = _check([generation_metrics], tiny_copy, "reference_checksum")
    assert not failed.passed
    assert "stats.npz does not match its recorded sha256" in failed.metadata["problems"].value["prologue"][0]


def test_sampling_protocol_fails_on_a_short_sample_set(tiny_copy):
    from assets.evaluation import samples

    [target] = tiny_plan(tiny_copy).samples("prologue")
    manifest_path = Path(target.artifact.file_path("_manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    first_class = next(iter(manifest["counts"]["per_class"]["cfg"]))
    manifest["counts"]["per_class"]["cfg"][first_class] -= 1  # as if a shard had come back short
    manifest_path.write_text(json.dumps(manifest))
    failed = _check([samples], tiny_copy, "sampling_protocol")
    assert not failed.passed
    assert f"class {first_class!r} has 11 samples" in failed.metadata["problems"].value["prologue"][0]


def test_nan_tensor_helper_really_writes_a_nan(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(save({"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)}))
    _poison(path)
    assert torch.isnan(load(path.read_bytes())["a"]).sum() == 1


def test_domain_accuracy_fails_below_its_floor(tiny_graph):
    """The floor is a check threshold, not a training setting: the same stored classifier passes at
    the tiny floor and fails a floor above its val top-1."""
    from assets.evaluation import domain_classifier
    from pipelines.store import Store

    top1 = tiny_plan(Store(str(tiny_graph.root))).domain().require().metrics["val_top1"]
    assert top1 < 0.99
    for floor, passes in ((0.0, True), (top1 + 0.01, False)):
        resources = tiny_resources(tiny_graph.root, [f"evaluation.domain_min_top1={floor}"])
        result = materialize([domain_classifier], instance=DagsterInstance.ephemeral(), resources=resources,
                             raise_on_error=False)  # fmt: skip
        [evaluation] = result.get_asset_check_evaluations()
        assert evaluation.passed is passes, (floor, top1)
        if not passes:
            assert "below the floor" in evaluation.metadata["problems"].value["domain_classifier"][0]
