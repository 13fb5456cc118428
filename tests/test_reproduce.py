"""`pipelines.reproduce`: a variant rerun into an empty store gives the reference store's numbers."""

from __future__ import annotations

import json
import math

from pipelines.reproduce import compare, is_timing, main, numbers, same_numbers, summary_line


def _manifest(metrics: dict, files: dict[str, str]) -> dict:
    return {"metrics": metrics, "counts": {"steps": 30}, "files": {k: {"sha256": v} for k, v in files.items()}}


def test_compare_names_each_differing_number_and_file():
    mine = _manifest({"psnr": 20.0, "cfg": {"fd": [1.0, 2.0]}, "nan": math.nan, "ok": True}, {"a": "1", "log": "2"})
    theirs = _manifest({"psnr": 20.0, "cfg": {"fd": [1.0, 2.5]}, "nan": math.nan, "extra": 3}, {"a": "1", "log": "3"})
    diff = compare(mine, theirs)
    assert diff["numbers"] == 5 and diff["numbers_differ"] == {"metrics.cfg.fd[1]": 0.5}  # NaN equals NaN
    assert diff["numbers_only_in_one"] == ["metrics.extra"] and diff["files_differ"] == ["log"]
    assert diff["numbers_identical"] == 4  # psnr, fd[0], nan, counts.steps
    assert dict(numbers({"a": {"b": [1, True, "x"]}})) == {"a.b[0]": 1.0}  # booleans and strings are not numbers


def test_durations_and_rates_are_timing_not_results():
    mine = _manifest({"final": {"tokens_per_s": 12969.0, "loss": 2.0}, "train": {"seconds": 863.0}}, {})
    theirs = _manifest({"final": {"tokens_per_s": 13649.0, "loss": 2.0}, "train": {"seconds": 116.0}}, {})
    diff = compare(mine, theirs)
    assert diff["numbers"] == 2 and diff["numbers_differ"] == {} and same_numbers([diff])  # loss and steps
    assert diff["timing_differ"] == ["metrics.final.tokens_per_s", "metrics.train.seconds"]
    assert "2 timing numbers differ, not compared" in summary_line({"artefact": "ar_model[baseline]", **diff})
    theirs["metrics"]["final"]["loss"] = 2.5  # a result that moves still fails
    assert not same_numbers([compare(mine, theirs)])
    assert [is_timing(k) for k in ("metrics.seconds", "metrics.images_per_s[0]", "metrics.per_step")] == [
        True, True, False]  # fmt: skip


def test_a_rerun_from_an_empty_store_gives_the_same_numbers(tiny_graph, tmp_path, capsys):
    argv = ["--profile", "tiny", "--variant", "prologue", "--against", str(tiny_graph.root), "--store",
            str(tmp_path / "rerun"), "--step", "tokenizer", "--json", str(tmp_path / "report.json")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["same_numbers"] and [e["artefact"] for e in report["artefacts"]] == [
        "image_shards[train]", "image_shards[val]", "tokenizer[prologue]"]  # fmt: skip
    tokenizer = report["artefacts"][-1]
    assert tokenizer["numbers"] > 5
    weights = {"model/tokenizer.safetensors", "model/prior.safetensors"}
    assert not weights & set(tokenizer["files_differ"])  # bit-identical weights
    assert "the same numbers in 3 artefacts" in out
    # a number changed in the rerun's manifest is found and fails the command (nothing is retrained)
    manifest = next((tmp_path / "rerun" / "tokenizer").glob("*/_manifest.json"))
    raw = json.loads(manifest.read_text())
    name = next(k for k, v in raw["metrics"].items() if isinstance(v, float))
    raw["metrics"][name] += 1e-6
    manifest.write_text(json.dumps(raw))
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert f"1 of {tokenizer['numbers']} numbers differ" in out and f"metrics.{name}" in out and "NOT" in out


def test_a_variant_against_another_variants_chain_pairs_step_by_step(tiny_graph, capsys):
    store = str(tiny_graph.root)
    argv = ["--profile", "tiny", "--variant", "prologue", "--against", store, "--store", store, "--step", "tokenizer"]
    # the same variant named as the reference: every artefact paired with its own key
    assert main([*argv, "--against-variant", "tiny:prologue"]) == 0
    out = capsys.readouterr().out
    assert "'s prologue in" in out and "the same numbers in 3 artefacts" in out and " against " not in out.split(
        "\n")[-3]  # the tokenizer line: its own key  # fmt: skip
    # another variant: the shards pair with their own key, the tokenizers by step, and their numbers differ
    assert main([*argv, "--against-variant", "baseline"]) == 1
    out = capsys.readouterr().out
    assert "tokenizer[prologue] against tokenizer[baseline]: " in out and "numbers differ" in out and "NOT" in out
    assert "image_shards[train]: " in out  # same key: no "against"
