"""The plan and the layering: one place computes every key, steps never call upstream steps, a
missing input fails at once naming what to materialise, a run lists the source once."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modeling.config import ConfigError
from pipelines.plan import MissingInput, Plan
from pipelines.profiles import load_profile
from pipelines.store import Store
from tests.conftest import tiny_plan

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((Path(__file__).parent / "golden_keys.json").read_text())


def _imports(path: Path) -> set[str]:
    """Every module a file imports (at any depth: lazy imports inside functions count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


@pytest.mark.parametrize("layer,forbidden", [
    ("modeling", ("pipelines", "assets", "dagster")),
    ("pipelines", ("assets", "dagster")),
])  # fmt: skip
def test_layers_import_downward_only(layer, forbidden):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files
    bad = {
        f"{f.relative_to(ROOT)} imports {m}"
        for f in files
        for m in _imports(f)
        if m.split(".")[0] in forbidden and not m.startswith("dagster_pipes")  # Pipes is the workers' client
    }
    assert not bad, sorted(bad)


STEP_ENTRIES = {
    "sharding": "shard_split", "train_tokenizer": "train_tokenizer", "token_export": "export_tokens",
    "train_ar": "train_ar", "sampling": "generate_samples", "results": "results_table",
    "evaluate": ("reference_stats", "reconstruction_metrics", "generation_metrics", "linear_probe"),
}  # fmt: skip


def test_no_step_calls_another_step():
    entries = {name for v in STEP_ENTRIES.values() for name in ((v,) if isinstance(v, str) else v)}
    for module in STEP_ENTRIES:
        tree = ast.parse((ROOT / "pipelines" / f"{module}.py").read_text())
        own = STEP_ENTRIES[module]
        own = {own} if isinstance(own, str) else set(own)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipelines."):
                imported = {a.name for a in node.names} & entries
                assert not imported, f"pipelines/{module}.py imports step entries {imported}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in entries - own, f"pipelines/{module}.py calls {node.func.id}"


def test_no_long_functions_in_pipelines():
    long = []
    for f in sorted((ROOT / "pipelines").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{f.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def _keys(plan: Plan) -> dict:
    keys = {plan.shards(s).label: plan.shards(s).key for s in ("train", "val")}
    keys |= {plan.reference(e).label: plan.reference(e).key for e in plan.evaluators}
    keys[plan.domain().label] = plan.domain().key
    for v in plan.profile.variants:
        for asset in ("tokenizer", "token_dataset", "ar_model", "sampling_tuning", "samples", "reconstruction_metrics",
                      "generation_metrics", "linear_probe", "mechanism_metrics"):  # fmt: skip
            targets = plan.targets(asset, v)
            keys[targets[0].label] = [t.key for t in targets] if asset == "samples" else targets[0].key
    return keys


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_cache_keys(name, fashion_mnist, tmp_path):
    """Today's keys, pinned: a change to them makes every stored artefact unreachable (bump the
    asset's code version on purpose, and regenerate this file, when the bytes must change)."""
    assert _keys(Plan.from_listing(load_profile(name), Store(str(tmp_path)))) == GOLDEN[name]


def test_the_whole_graph_lists_the_source_once_and_records_each_partition(tiny_graph):
    assert tiny_graph.listings == 2  # one listing: the train and the val split, in image_shards
    records = tiny_graph.instance.get_run_records()
    [run] = [r for r in records if r.dagster_run.run_id == tiny_graph.run_id]
    events = tiny_graph.instance.all_logs(tiny_graph.run_id)
    mats = [e.dagster_event.event_specific_data.materialization for e in events
            if e.dagster_event is not None and e.dagster_event.is_step_materialization]  # fmt: skip
    seen = [(m.asset_key.to_user_string(), m.partition) for m in mats]
    variant_assets = ("tokenizer", "token_dataset", "ar_model", "sampling_tuning", "samples", "mechanism_metrics",
                      "reconstruction_metrics",
                      "generation_metrics", "linear_probe")  # fmt: skip
    expected = {("image_shards", None), ("reference_stats", None), ("domain_classifier", None), ("results_table", None)}
    expected |= {(a, v) for a in variant_assets for v in ("baseline", "prologue")}
    assert sorted(seen, key=str) == sorted(expected, key=str)  # exactly one each
    for m in mats:  # each partition built by its own step (nothing reused), with its own step time
        reused = [v.value for k, v in m.metadata.items() if k.endswith("reused_existing")]
        seconds = [v.value for k, v in m.metadata.items() if k.endswith("seconds")]
        assert reused and not any(reused) and seconds and all(s >= 0 for s in seconds), m.asset_key
    assert run.dagster_run.is_success


def test_missing_input_names_the_asset_and_partition(tmp_path, fashion_mnist):
    from pipelines.train_ar import train_ar

    plan = tiny_plan(Store(str(tmp_path / "empty")))
    with pytest.raises(MissingInput, match=r"token_dataset\[prologue\] is not materialised .* materialise "
                                           r"token_dataset\[prologue\] first"):  # fmt: skip
        train_ar(plan, "prologue", progress=False)
    assert sorted(os.listdir(tmp_path / "empty")) == []  # nothing written, nothing trained


def test_cli_materialize_on_an_empty_store_fails_naming_the_missing_input(tmp_path, fashion_mnist):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "DAGSTER_HOME": str(home), "PROLOGUE_PROFILE": "tiny", "PROLOGUE_STORE": str(tmp_path / "s")}
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "assets.definitions",
         "--select", "ar_model", "--partition", "prologue"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    assert "token_dataset[prologue] is not materialised" in out.stdout + out.stderr
    assert not (tmp_path / "s" / "ar_model").exists() and not (tmp_path / "s" / "tokenizer").exists()


def test_runner_announces_and_runs_only_the_missing_steps(tiny_copy):
    store = tiny_copy
    plan = tiny_plan(store)
    shutil.rmtree(plan.probe("prologue").artifact.path)
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.results", "--profile", "tiny", "--store", store.url, "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    announced = [line for line in out.stdout.splitlines() if line.startswith("==> ")]
    assert announced == ["==> [1/2] linear_probe[prologue] (missing: running it)",
                         "==> [2/2] results_table (missing: running it)"]  # fmt: skip
    assert plan.probe("prologue").manifest() is not None
    assert "results_table: 2 rows (cached)" in out.stdout  # the same numbers: the same table


@pytest.mark.parametrize("module,args,expected", [
    ("pipelines.sharding", [], "image_shards[val]:"),
    ("pipelines.train_tokenizer", ["--variant", "prologue"], "val PSNR"),
    ("pipelines.token_export", ["--variant", "baseline"], "1024 train / 128 val rows"),
    ("pipelines.train_ar", ["--variant", "prologue"], "val ce_visual"),
    ("pipelines.domain", [], "val top-1"),
    ("pipelines.tuning", ["--variant", "prologue"], "nocfg: T "),
    ("pipelines.sampling", ["--variant", "baseline"], "'cfg': 120"),
    ("pipelines.evaluate", ["--step", "reference_stats"], "stats sha256"),
    ("pipelines.evaluate", ["--step", "reconstruction_metrics", "--variant", "prologue"], "rfd_effnetlite0="),
    ("pipelines.evaluate", ["--step", "generation_metrics", "--variant", "prologue"], "128 reference images"),
    ("pipelines.evaluate", ["--step", "linear_probe", "--variant", "baseline"], "train_rows"),
    ("pipelines.mechanism", ["--variant", "prologue"], "resample keep"),
    ("pipelines.results", [], "results_table: 2 rows"),
])  # fmt: skip
def test_every_step_has_a_cli(module, args, expected, tiny_graph, capsys):
    """Each step's command line on the trained tiny store (in this process: the entry point is the
    same `main`; `python -m` itself is run by the runner test above)."""
    import importlib

    argv = ["--profile", "tiny", "--store", str(tiny_graph.root), "--no-progress", *args]
    assert importlib.import_module(module).main(argv) == 0
    out = capsys.readouterr().out
    assert expected in out and "(cached)" in out, out[-2000:]


def test_a_profile_whose_variants_are_not_the_partitions_fails_before_any_work(tmp_path):
    from dagster import DagsterInstance, materialize

    from assets.data import image_shards
    from tests.conftest import tiny_resources

    resources = tiny_resources(tmp_path / "store", ["variants=baseline,prologue,prologue_z3"])
    result = materialize([image_shards], resources=resources, instance=DagsterInstance.ephemeral(),
                         raise_on_error=False)  # fmt: skip
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.to_string()
    assert "prologue_z3" in message and "PROLOGUE_PROFILE" in message
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_configs_cannot_be_made_invalid_by_replace():
    from dataclasses import replace

    profile = load_profile("tiny")
    with pytest.raises(ConfigError, match="patch_size"):
        replace(profile.tokenizer, patch_size=5)
    with pytest.raises(ConfigError, match="shard_size"):
        replace(profile.data, shard_size=0)
    with pytest.raises(ConfigError, match=r"tokenizer\.image_size"):
        replace(profile, data=replace(profile.data, resolution=64))


def test_every_stored_manifest_parses_into_its_typed_class(tiny_graph):
    from pipelines.manifests import MANIFESTS, ARManifest, TokensManifest, parse

    paths = sorted(tiny_graph.root.glob("*/*/_manifest.json"))
    parsed = [parse(json.loads(p.read_text())) for p in paths]
    assert {m.asset for m in parsed} == set(MANIFESTS) and len(parsed) == 2 + 1 + 1 + 9 * 2 + 1
    tokens = next(m for m in parsed if isinstance(m, TokensManifest) and m.codes.z_len)
    assert tokens.codes.num_visual == 16 and tokens.files["sanity.png"].size > 0
    ar = next(m for m in parsed if isinstance(m, ARManifest))
    assert ar.counts.steps == 40 and ar.counts.parameters > 0
    raw = json.loads(paths[0].read_text())
    with pytest.raises(ValueError, match="unknown field 'surprise'"):
        parse({**raw, "surprise": 1})
    del raw["lineage"]
    with pytest.raises(ValueError, match="lineage"):
        parse(raw)
