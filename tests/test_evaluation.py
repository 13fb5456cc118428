"""Sampling and evaluation on the tiny profile: the Dagster `evaluation` group, reuse, protocol guards."""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from dagster import AssetSelection, DagsterInstance, materialize
from PIL import Image

from modeling.config import from_dict
from modeling.sampler import SamplerConfig
from pipelines.plan import MissingInput
from pipelines.profiles import load_profile
from pipelines.sampling import generate_samples, protocol_problems
from pipelines.store import Store
from tests.conftest import tiny_plan, tiny_resources


def _mtimes(root: Path, assets: tuple[str, ...]) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for a in assets for p in (root / a).rglob("*") if p.is_file()}


@pytest.fixture
def full_run(tiny_graph):
    """The whole graph on the tiny profile (both variants), trained once per test run by one run of
    the `retrain` job: (store folder, a fresh Dagster instance for this test's runs, the run's seconds)."""
    return tiny_graph.root, DagsterInstance.ephemeral(), tiny_graph.seconds


def _materialisations(result) -> dict[tuple[str, str | None], dict]:
    return {
        (e.asset_key.to_user_string(), e.materialization.partition): {
            k: v.value for k, v in e.materialization.metadata.items()
        }
        for e in result.get_asset_materialization_events()
    }


def test_rerun_of_the_whole_graph_with_nothing_new_trains_nothing(full_run, tiny_graph):
    from fsspec.implementations.local import LocalFileSystem

    from assets.definitions import defs

    root, instance, _ = full_run
    stored = tuple(p.name for p in root.iterdir())
    before = _mtimes(root, stored)
    data_reads = []  # shard, token and weight files opened or read: none, nothing is new
    open_, cat = LocalFileSystem._open, LocalFileSystem.cat_file

    def is_data(path) -> bool:
        return any(f"/{a}/" in str(path) for a in ("image_shards", "token_dataset")) or str(path).endswith(
            ".safetensors"
        )

    def opening(self, path, *args, **kwargs):
        if is_data(path) and not str(path).endswith((".json", ".png")):  # manifests, previews
            data_reads.append(str(path))
        return open_(self, path, *args, **kwargs)

    def reading(self, path, *args, **kwargs):
        if is_data(path) and not str(path).endswith((".json", ".png")):  # manifests, previews
            data_reads.append(str(path))
        return cat(self, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalFileSystem, "_open", opening)
        mp.setattr(LocalFileSystem, "cat_file", reading)
        result = defs.resolve_job_def("retrain").execute_in_process(instance=instance, resources=tiny_resources(root))
    assert result.success
    assert data_reads == []
    mats = _materialisations(result)
    # shards, reference stats, domain classifier, 9 variant assets x 2 partitions, table
    assert len(mats) == 1 + 1 + 1 + 9 * 2 + 1
    for (name, _), md in mats.items():
        reused = [v for k, v in md.items() if k.endswith("reused_existing")]
        assert reused and all(reused), name
    assert _mtimes(root, stored) == before  # no checkpoint, weight, sample or metrics file was written
    # the first run's log has the trainers' checkpoint lines; this one has none
    assert any("checkpoint" in e.user_message for e in tiny_graph.instance.all_logs(tiny_graph.run_id))
    assert not any("checkpoint" in e.user_message for e in instance.all_logs(result.run_id))
    assert all(c.passed for c in result.get_asset_check_evaluations())


def test_results_table_has_one_row_per_variant_with_evaluator_names(full_run):
    root = full_run[0]
    [art] = (root / "results_table").iterdir()
    table = pq.read_table(art / "results.parquet").to_pylist()
    assert [r["variant"] for r in table] == ["baseline", "prologue"]
    # both variants' samples side by side, the prologue's resampling rows; no budget varies on tiny
    assert Image.open(art / "samples.png").size[0] > 2 * 8 * 32 and not (art / "budgets.png").exists()
    assert (art / "resample.png").read_bytes() == next((root / "samples").glob("*/resample_visual.png")).read_bytes()
    for r in table:
        assert r["rfd_effnetlite0"] > 0 and r["gfd_effnetlite0_cfg"] > 0 and r["gfd_effnetlite0_nocfg"] > 0
        assert 0 <= r["probe_top1"] <= 1 and r["reference_images"] == 128
        # EfficientNet embeds 4 samples per class of each set, the domain evaluator all 12
        assert r["samples_per_guidance"] == 40 and r["domain_images"] == 120
        assert not any("fid" in k for k in r)  # no EfficientNet number under an Inception name
        assert 0 <= r["class_consistency_cfg"] <= 1 and r["fd_domain_nocfg"] >= 0 and r["fd_domain_ar_only_cfg"] >= 0
        assert r["recon_fd_domain"] >= 0 and r["real_class_consistency"] == table[0]["real_class_consistency"]
        assert r["tuning_points"] == 4 + 4 and "s_max" in r["sampler_cfg"]
        assert 0 <= r["same_class_pair_rate"] <= 1
    assert [r["probe_on"] for r in table] == ["first_visual", "prologue"]  # like for like: z_len tokens each
    # each variant's selection names only the knobs it has: the baseline has no prologue positions
    assert table[0]["sampler_nocfg"].startswith("T_visual ") and "prologue" not in table[0]["sampler_cfg"]
    assert table[1]["sampler_nocfg"].startswith("T ") and "prologue" in table[1]["sampler_cfg"]
    assert table[0]["resample_keep_rate"] is None and 0 <= table[1]["resample_keep_rate"] <= 1
    assert table[0]["ar_visual_ce_true"] is None and table[1]["ar_visual_ce_true"] > 0
    # codebook usage from each tokenizer's val evaluation: the baseline has no prologue codebook
    tok = {v: json.loads(next(p for p in (root / "tokenizer").glob("*/_manifest.json")
                              if json.loads(p.read_text())["config"]["variant"] == v).read_text())["metrics"]
           for v in ("baseline", "prologue")}  # fmt: skip
    assert table[0]["prologue_codes_used"] is None and table[0]["visual_perplexity"] > 1
    used = tok["prologue"]["prologue_codes"]
    assert table[1]["prologue_codes_used"] == used["fraction_used"]
    assert table[1]["prologue_codebook"] == used["codebook_size"]
    md = (art / "results.md").read_text()
    assert "not FID" in md and "| prologue |" in md
    n = round(used["fraction_used"] * used["codebook_size"])
    assert f"| prologue | {round(table[1]['visual_codes_used'] * table[1]['visual_codebook'])} of " in md
    assert f" / {n} of {used['codebook_size']} (perplexity {used['perplexity']:.1f}) |" in md and " (perplexity " in md
    # every step of the tiny store was written by this code: each has its wall and CPU time
    times = json.loads((art / "_manifest.json").read_text())["step_times"]
    assert times["untimed_artefacts"] == 0
    assert times["total"]["cpu_s"] >= times["variants"]["prologue"]["tokenizer"]["cpu_s"] > 1
    assert all(t is not None for steps in times["variants"].values() for t in steps.values())
    assert "**Wall time per step**" in md and f"{times['artefacts']} of {times['artefacts']} distinct artefacts" in md
    # one machine wrote the whole tiny store: named once, with every timed artefact
    [(label, n)] = times["machines"].items()
    assert n == times["artefacts"] and f"Written on: {label} ({n} artefacts)." in md and "Several machines" not in md
    assert f"(first {table[0]['probe_tokens']} visual)" in md and f"({table[1]['probe_tokens']} prologue)" in md


def test_so_far_prints_the_finished_variants_and_writes_nothing_to_the_store(full_run, capsys, tmp_path):
    from pipelines.results import main

    root = full_run[0]
    before = _mtimes(root, ("results_table", "tokenizer", "ar_model", "samples"))
    # prologue_s1 has nothing in the store: pending, and not trained by --so-far
    argv = ["--profile", "tiny", "--store", str(root), "--set", "variants=baseline,prologue,prologue_s1"]
    assert main([*argv, "--so-far"]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 variants finished; pending: prologue_s1." in out
    assert "| baseline |" in out and "| prologue |" in out and "| prologue_s1 |" not in out
    assert "**Wall time per step**" in out and "Over training seeds" not in out  # one seed per arm so far
    assert "![" not in out
    # with a folder: the finished variants' figures, written there and linked
    assert main([*argv, "--so-far", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    [table] = (root / "results_table").iterdir()
    assert (tmp_path / "figs" / "samples.png").read_bytes() == (table / "samples.png").read_bytes()
    assert f"]({(tmp_path / 'figs' / 'resample.png').as_posix()})" in out
    assert _mtimes(root, ("results_table", "tokenizer", "ar_model", "samples")) == before  # no file added


def test_the_readme_block_holds_the_tables_and_links_the_copied_figures(full_run, tmp_path):
    from pipelines.results import readme_block

    root = full_run[0]
    [key] = [p.name for p in (root / "results_table").iterdir()]
    text = readme_block(Store(str(root)).artifact("results_table", key), "tiny", root=tmp_path)
    assert text.startswith((root / "results_table" / key / "results.md").read_text())
    for name in ("samples.png", "resample.png"):
        copied = tmp_path / "docs" / "figures" / "tiny" / name
        assert copied.read_bytes() == (root / "results_table" / key / name).read_bytes()
        assert f"](docs/figures/tiny/{name})" in text
    assert "budgets.png" not in text


def test_the_standalone_table_command_copies_itself_into_the_readme(full_run, tmp_path, monkeypatch, capsys):
    import pipelines.results as results

    root = full_run[0]
    readme = tmp_path / "README.md"
    blocks = "<!-- results:tiny -->\nold\n<!-- /results -->\n<!-- results:fashion32 -->\nkept\n<!-- /results -->\n"
    readme.write_text("# x\n" + blocks)
    monkeypatch.setattr(results, "README", readme)
    argv = ["--profile", "tiny", "--store", str(root), "--readme"]
    assert results.main(argv) == 0  # the table is in the store: nothing recomputed, only copied
    [key] = [p.name for p in (root / "results_table").iterdir()]
    text = readme.read_text()
    assert "old" not in text and "kept" in text
    assert (root / "results_table" / key / "results.md").read_text() in text
    copied = tmp_path / "docs" / "figures" / "tiny" / "samples.png"
    assert copied.read_bytes() == (root / "results_table" / key / "samples.png").read_bytes()
    assert f"(copied into {readme}" in capsys.readouterr().out
    # a README without the profile's block is left alone, and the command says so
    readme.write_text("# x\n")
    assert results.main(argv) == 0
    assert readme.read_text() == "# x\n" and "nothing copied" in capsys.readouterr().out


def _reused(md: dict) -> bool:
    flags = [v for k, v in md.items() if k.endswith("reused_existing")]
    return bool(flags) and all(flags)


def test_evaluation_group_reruns_no_upstream_step_and_reuses_samples(full_run, tmp_path):
    from assets.definitions import defs

    root, instance, _ = full_run
    upstream = ("image_shards", "tokenizer", "token_dataset", "ar_model")
    before = _mtimes(root, upstream)
    group = AssetSelection.groups("evaluation").resolve(defs.resolve_asset_graph())
    evaluation = [a for a in defs.assets if hasattr(a, "key") and a.key in group]
    result = materialize(
        evaluation,
        partition_key="prologue",
        resources=tiny_resources(root),
        instance=instance,
        selection=AssetSelection.groups("evaluation") - AssetSelection.assets("results_table"),
    )
    assert result.success
    md = _materialisations(result)
    assert md[("samples", "prologue")]["reused_existing"] is True
    assert all(_reused(m) for m in md.values())
    assert _mtimes(root, upstream) == before  # nothing upstream was rewritten, nothing trained

    # a new tuning grid: new tuning, samples, generation and mechanism metrics, nothing else, still no
    # training (one variant: the table, which needs every variant's, is left out of this selection)
    shutil.copytree(root, tmp_path / "copy")
    copy = tmp_path / "copy"
    before = _mtimes(copy, upstream)
    changed = materialize(
        evaluation,
        partition_key="prologue",
        instance=instance,
        resources=tiny_resources(copy, ["tuning.samples_per_class=3"]),
        selection=AssetSelection.groups("evaluation") - AssetSelection.assets("results_table"),
    )
    assert changed.success
    md = _materialisations(changed)
    for name in ("sampling_tuning", "samples", "generation_metrics", "mechanism_metrics"):
        assert not _reused(md[(name, "prologue")]), name
    for name in ("reconstruction_metrics", "linear_probe"):
        assert _reused(md[(name, "prologue")]), name
    assert _reused(md[("reference_stats", None)]) and _reused(md[("domain_classifier", None)])
    assert ("results_table", None) not in md
    assert _mtimes(copy, upstream) == before
    checks = [e for e in changed.get_asset_check_evaluations()]
    assert {c.check_name for c in checks} == {"sampling_protocol", "reference_checksum", "domain_accuracy"} and all(
        c.passed for c in checks
    )


def test_any_sample_regenerates_alone(full_run):
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from modeling.sampler import sample
    from pipelines.loaders import load_ar, load_tokenizer

    root = full_run[0]
    store, profile = Store(str(root)), load_profile("tiny")
    [r] = generate_samples(tiny_plan(store), "prologue", progress=False)
    assert r.cached
    rel = r.manifest.layout["nocfg"][3]
    with open(r.artifact.file_path(rel), "rb") as f:
        stored = list(group_by_keys(tar_file_expander([{"url": rel, "stream": f}])))
    import json

    meta = json.loads(stored[2]["json"])
    model = load_ar(store.artifact("ar_model", r.manifest.lineage["ar_model"]))
    tokenizer = load_tokenizer(store.artifact("tokenizer", r.manifest.lineage["tokenizer"]))
    nocfg = from_dict(SamplerConfig, r.manifest.samplers["nocfg"])  # the tuned no-guidance settings
    assert nocfg.cfg_schedule == "none" and nocfg.seed == profile.sampler.seed
    codes = sample(model, torch.tensor([meta["class"]]), torch.tensor([meta["seed"]]), nocfg)
    assert codes["prologue"][0].tolist() == meta["prologue"]
    with torch.no_grad():
        image = ((tokenizer.decode_codes(codes["visual"]).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert np.array_equal(image[0].permute(1, 2, 0).numpy(), np.asarray(Image.open(io.BytesIO(stored[2]["png"]))))


def test_interrupted_sampling_redoes_only_the_missing_shard(full_run, tmp_path):
    root = full_run[0]
    shutil.copytree(root, tmp_path / "copy")
    plan = tiny_plan(Store(str(tmp_path / "copy")))
    [r] = generate_samples(plan, "baseline", progress=False)
    art = r.artifact
    mtimes = {rel: os.path.getmtime(art.file_path(rel)) for rel in r.manifest.files if rel.endswith(".tar")}
    os.remove(art.file_path("_manifest.json"))  # as if killed after all but one shard
    os.remove(art.file_path("_parts/cfg-c0003-001.json"))
    [again] = generate_samples(plan, "baseline", progress=False)
    assert not again.cached
    changed = {rel for rel, t in mtimes.items() if os.path.getmtime(art.file_path(rel)) != t}
    assert changed == {"samples/cfg-c0003-001.tar"}
    data = {k: v for k, v in r.manifest.files.items() if k.endswith(".tar")}
    assert all(again.manifest.files[k] == v for k, v in data.items())  # deterministic: same bytes
    assert again.manifest.counts["unique_seeds"] == {"cfg": 120, "nocfg": 120}


def test_protocol_guards_name_what_differs(full_run):
    root = full_run[0]
    store, profile = Store(str(root)), load_profile("tiny")
    [r] = generate_samples(tiny_plan(store), "prologue", progress=False)
    assert protocol_problems(r.artifact, r.manifest, profile) == []
    counts = r.manifest.counts
    bad = replace(r.manifest, counts={
        **counts,
        "unique_seeds": {"cfg": 119, "nocfg": 120},
        "per_class": {**counts["per_class"], "cfg": {**counts["per_class"]["cfg"], "Bag": 11}},
    })  # fmt: skip
    problems = protocol_problems(r.artifact, bad, profile)
    assert any("'Bag' has 11 samples" in p for p in problems) and any("119 unique seeds" in p for p in problems)
    bigger = replace(profile, data=replace(profile.data, resolution=48),
                     tokenizer=replace(profile.tokenizer, image_size=48))  # fmt: skip
    assert any("PNG 48x48" in p for p in protocol_problems(r.artifact, r.manifest, bigger))


def test_inception_metrics_only_with_a_configured_weights_file(tiny_copy, tmp_path):
    from pipelines.evaluate import reconstruction_metrics, reference_stats
    from pipelines.runner import run_missing
    from tests.test_fidelity import random_inception_weights

    weights = tmp_path / "inception.pth"
    random_inception_weights(weights)  # a real torch-fidelity InceptionV3 state dict, random weights, no download
    small = tiny_plan(tiny_copy, ["evaluation.reference_images=32"])
    for e in small.evaluators:
        reference_stats(small, e)
    plain = reconstruction_metrics(small, "prologue")
    assert "rfd_effnetlite0" in plain.manifest.metrics
    assert not any("inception" in k for k in plain.manifest.metrics)
    plan = tiny_plan(tiny_copy, ["evaluation.reference_images=32", f"evaluation.inception_weights={weights}"])
    with pytest.raises(MissingInput, match=r"reference_stats\[inception\]"):  # an input like any other
        reconstruction_metrics(plan, "prologue")
    [r] = run_missing(plan, "reconstruction_metrics", ["prologue"], on_log=lambda _: None).values()
    m = r.manifest.metrics
    assert m["rfid_inception"] > 0 and "recon_is_inception_mean" in m and m["images"] == 32
    assert m["rfd_effnetlite0"] == plain.manifest.metrics["rfd_effnetlite0"]  # same reference, same number
    assert set(m["references"]) == {"effnetlite0", "inception"}


def test_sampling_runs_report_mean_and_spread(tiny_copy):
    from pipelines.evaluate import generation_metrics
    from pipelines.results import results_table
    from pipelines.runner import run_missing

    # the baseline alone (a table of one row): the second sampling run costs what it must, once
    one, two = tiny_plan(tiny_copy), tiny_plan(tiny_copy, ["evaluation.sampling_runs=2", "variants=baseline"])
    seed = one.profile.sampler.seed
    first = generation_metrics(one, "baseline")
    assert two.samples("baseline")[0].key == one.samples("baseline")[0].key  # run 1 is shared
    built = run_missing(two, "generation_metrics", ["baseline"], on_log=lambda _: None, progress=False)
    r = generation_metrics(two, "baseline")
    assert first.cached and not built["baseline"].cached and r.cached and r.artifact.key != first.artifact.key
    m = r.manifest.metrics
    assert m["seeds"] == [seed, seed + 1] and m["cfg"] == first.manifest.metrics["cfg"]
    a, b = (m["per_seed"][str(s)]["nocfg"]["fd_effnetlite0"] for s in m["seeds"])
    assert a != b  # another seed, another sample set
    spread = m["over_seeds"]["nocfg"]["fd_effnetlite0"]
    assert spread["mean"] == pytest.approx((a + b) / 2) and spread["std"] == pytest.approx(abs(a - b) / 2**0.5)
    table = results_table(two)
    [row] = [
        x
        for x in pq.read_table(io.BytesIO(table.artifact.read_bytes("results.parquet"))).to_pylist()
        if x["variant"] == "baseline"
    ]
    assert row["sampling_runs"] == 2 and row["gfd_effnetlite0_nocfg"] == pytest.approx(spread["mean"])
    md = table.artifact.read_bytes("results.md").decode()
    assert " ± " in md and "in each of 2 sampling runs (mean ± sample std)" in md
