"""Stage-1 training: resumable state, learning, kill-and-resume, 2-process DDP, the Dagster asset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dagster import DagsterInstance, materialize

from modeling.tokenizer_trainer import TokenizerTrainer
from pipelines.checkpoints import latest_checkpoint, load_checkpoint, load_tensors, save_checkpoint
from pipelines.profiles import load_profile
from pipelines.store import Store
from pipelines.train_tokenizer import train_tokenizer
from tests.conftest import copy_store, tiny_plan, tiny_resources

ROOT = Path(__file__).resolve().parents[1]


def _batches(n: int, size: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 256, (size, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(n)]


@pytest.mark.parametrize("variant", ["baseline", "prologue"])
def test_checkpoint_round_trip_continues_identically(variant, store):
    # the discriminator and the codebook-restart counters/RNG are part of the state too
    profile = load_profile("tiny", ["tokenizer_train.gan_start=2", "tokenizer_train.restart_dead_codes_every=2"])
    model_cfg, cfg = profile.tokenizer_for(variant), profile.tokenizer_train
    batches = _batches(6)

    straight = TokenizerTrainer(model_cfg, cfg, torch.device("cpu"))
    for b in batches:
        straight.train_step(b)

    first = TokenizerTrainer(model_cfg, cfg, torch.device("cpu"))
    for b in batches[:3]:
        first.train_step(b)
    art = store.artifact("tokenizer", f"roundtrip-{variant}")
    save_checkpoint(art, first.step, first.tensors(), first.training_state())
    del first

    resumed = TokenizerTrainer(model_cfg, cfg, torch.device("cpu"))
    resumed.load(*load_checkpoint(art, latest_checkpoint(art)))
    assert resumed.step == 3
    for b in batches[3:]:
        resumed.train_step(b)
    a, b = straight.tensors(), resumed.tensors()
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}.{k} differs after resume"


def test_baseline_has_no_prior_and_prologue_trains_it():
    profile = load_profile("tiny")
    base = TokenizerTrainer(profile.tokenizer_for("baseline"), profile.tokenizer_train, torch.device("cpu"))
    pro = TokenizerTrainer(profile.tokenizer_for("prologue"), profile.tokenizer_train, torch.device("cpu"))
    assert base.prior is None and "prior" not in base.tensors()
    before = {k: v.clone() for k, v in pro.prior.state_dict().items()}
    stats = pro.train_step(_batches(1)[0])
    assert {"ce_prologue", "ce_visual", "prior_ce_prologue", "prior_ce_visual"} <= stats.keys()
    assert any(not torch.equal(before[k], v) for k, v in pro.prior.state_dict().items())


def test_arms_share_initial_weights_data_order_and_the_discriminator_schedule():
    """Baseline and prologue trainers differ only in the prologue path: the same initial weights of
    every shared module, and a discriminator whose LR sequence starts at gan_start in both."""
    profile = load_profile("tiny", ["tokenizer_train.gan_start=3", "tokenizer_train.steps=8"])
    cfg, batches = profile.tokenizer_train, _batches(8)
    arms = {v: TokenizerTrainer(profile.tokenizer_for(v), cfg, torch.device("cpu")) for v in ("baseline", "prologue")}
    base, pro = arms["baseline"].tensors(), arms["prologue"].tensors()
    for name in ("tokenizer", "discriminator"):
        for k, v in base[name].items():
            assert torch.equal(pro[name][k], v), f"{name}.{k}"
    lrs = {v: [t.train_step(b).get("disc_lr") for b in batches] for v, t in arms.items()}
    assert lrs["baseline"] == lrs["prologue"]
    assert lrs["baseline"][:3] == [None] * 3 and all(lr > 0 for lr in lrs["baseline"][3:])
    assert lrs["baseline"][3] == pytest.approx(cfg.aux_lr / cfg.warmup_steps)  # its own warm-up from gan_start


def test_training_learns_and_writes_outputs(tmp_path, tiny_graph):
    store = copy_store(tiny_graph.root, Store(str(tmp_path)), ("image_shards",))
    plan = tiny_plan(store, ["tokenizer_train.steps=60", "tokenizer_train.gan_start=1000"])
    result = train_tokenizer(plan, "prologue", progress=False, on_log=lambda _: None)
    m = result.manifest
    history = [json.loads(line) for line in result.artifact.read_bytes("history.jsonl").decode().splitlines()]
    assert [h["step"] for h in history] == list(range(5, 61, 5))
    assert history[-1]["l1"] < 0.6 * history[0]["l1"]  # reconstruction learns
    assert history[-1]["prior_ce_visual"] < history[0]["prior_ce_visual"]  # so does the joint prior
    metrics = m.metrics
    assert metrics["images"] == 128 and metrics["psnr_db"] > 10
    assert 0 < metrics["visual_codes"]["fraction_used"] <= 1
    assert len(metrics["prologue_codes"]["used_per_position"]) == 2
    for rel in ("model/tokenizer.safetensors", "model/prior.safetensors", "reconstructions.png",
                "loss_curves.png", "metrics.json", "spec.json"):
        assert rel in m.files, rel
    assert result.artifact.verify(checksums=True) == []
    ema = load_tensors(result.artifact, "model/tokenizer.safetensors")
    assert not any("prior" in k for k in ema) and any("prologue_quantizer" in k for k in ema)
    again = train_tokenizer(plan, "prologue", progress=False, on_log=lambda _: None)
    assert again.cached and again.manifest == m


def _cli(store_url: str, *extra: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.train_tokenizer", "--profile", "tiny", "--store", store_url,
           "--variant", "prologue", "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_killed_training_resumes_to_identical_weights(tmp_path, tiny_graph):
    """The tiny profile's tokenizer (30 steps, GAN from 15, checkpoints every 10), killed after step 20
    and resumed, ends with the weights of the uninterrupted whole-graph run (same key, same machine)."""
    store_dir = tmp_path / "killed"
    copy_store(tiny_graph.root, Store(str(store_dir)), ("image_shards",))  # only the tokenizer is trained
    proc = _cli(str(store_dir), start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(store_dir.glob("tokenizer/*/_parts/ckpt-0000020.json")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    [art_dir] = store_dir.glob("tokenizer/*")
    assert not (art_dir / "_manifest.json").exists()

    resumed = _cli(str(store_dir))
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resumed from checkpoints/step-00000" in out

    clean_dir = tiny_graph.root / "tokenizer" / art_dir.name  # same config, same cache key
    killed_m = json.loads((art_dir / "_manifest.json").read_text())
    clean_m = json.loads((clean_dir / "_manifest.json").read_text())
    for rel in ("model/tokenizer.safetensors", "model/prior.safetensors"):
        assert killed_m["files"][rel]["sha256"] == clean_m["files"][rel]["sha256"], rel


def test_two_process_ddp_keeps_ranks_in_sync(tmp_path, tiny_graph):
    store = copy_store(tiny_graph.root, Store(str(tmp_path)), ("image_shards",))
    plan = tiny_plan(store, ["tokenizer_train.processes=2", "tokenizer_train.steps=12", "tokenizer_train.gan_start=6"])
    lines: list[str] = []
    result = train_tokenizer(plan, "prologue", progress=False, on_log=lines.append)
    metrics = result.manifest.metrics
    assert metrics["ranks"] == 2 and metrics["ranks_in_sync"] is True
    assert result.manifest.counts.steps == 12


def test_tokenizer_asset_both_variants_in_one_run(tmp_path, tiny_graph):
    from assets.automation import ALL_VARIANTS
    from assets.data import image_shards
    from assets.resources import ProfileResource
    from assets.tokenizer import tokenizer

    copy_store(tiny_graph.root, Store(str(tmp_path)), ("image_shards", "tokenizer"))  # trained by tiny_graph
    resources = tiny_resources(tmp_path)  # the tokenizer launches its worker through Dagster Pipes
    with DagsterInstance.ephemeral() as instance:
        # one run over both variant partitions: each gets its own materialisation and metadata
        result = materialize([image_shards, tokenizer], resources=resources, instance=instance, tags=ALL_VARIANTS)
        assert result.success
        mats = {
            e.materialization.partition: {k: v.value for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()
            if e.asset_key == tokenizer.key
        }
        assert set(mats) == {"baseline", "prologue"} and mats["baseline"]["cache_key"] != mats["prologue"]["cache_key"]
        for variant, md in mats.items():
            assert md["steps"] == 30 and md["val_images"] == 128
            assert "data:image/png;base64," in md["reconstructions"]
            assert ("prologue_codes_used" in md) == (variant == "prologue")
            assert md["val_psnr_db"] > 0 and md["trainable_parameters"] > 0
        # the two arms of the comparison read the same batches in the same order and step the
        # discriminator with the same LR from gan_start (15 in tiny): only the prologue path differs
        store = Store(str(tmp_path))
        hist = {
            v: [json.loads(line) for line in store.artifact("tokenizer", md["cache_key"]).read_bytes("history.jsonl")
                .decode().splitlines()]
            for v, md in mats.items()
        }  # fmt: skip
        same = ("step", "epoch", "data_checksum", "disc_lr")
        logged = {v: [[h.get(k) for k in same] for h in rows] for v, rows in hist.items()}
        assert logged["baseline"] == logged["prologue"]
        assert [h.get("disc_lr") is not None for h in hist["baseline"]] == [h["step"] > 15 for h in hist["baseline"]]
        checks = {c.check_name: c for c in result.get_asset_check_evaluations() if c.asset_key == tokenizer.key}
        assert set(checks) == {"weights_finite", "codebook_usage"} and all(c.passed for c in checks.values())

        # the usage floor is a check threshold, not a training setting: same artefact, failed blocking check
        floor = ProfileResource(name="tiny", overrides=["operations.codebook_usage_floor=0.99"])
        strict = {**resources, "profile": floor}
        result = materialize([tokenizer], partition_key="prologue", resources=strict, instance=instance,
                             raise_on_error=False)
        assert not result.success
        [usage] = [c for c in result.get_asset_check_evaluations() if c.check_name == "codebook_usage"]
        assert not usage.passed and "floor 0.99" in usage.metadata["problems"].value["prologue"][0]


def test_dead_code_restart_reseeds_unused_entries():
    from modeling.codebook_restart import DeadCodeRestarter
    from modeling.quantizers import VisualQuantizer

    q = VisualQuantizer(16, 4, 32)
    restarter = DeadCodeRestarter(q, every=2)
    x = torch.randn(4, 10, 16)
    out = q(x)
    used = set(out.codes.flatten().tolist())
    before = q.codebook.weight.detach().clone()
    restarter.observe(out.codes, out.projected)
    assert restarter.maybe_restart(1, torch.Generator().manual_seed(0)) == 0  # not a check step
    restarted = restarter.maybe_restart(2, torch.Generator().manual_seed(0))
    assert restarted == 32 - len(used)
    changed = {i for i in range(32) if not torch.equal(before[i], q.codebook.weight[i])}
    assert changed == set(range(32)) - used  # only dead entries move, to near recent outputs
    sims = torch.nn.functional.normalize(q.codebook.weight[sorted(changed)], dim=-1) @ out.projected.flatten(0, 1).T
    assert (sims.max(1).values > 0.99).all()
    assert restarter.counts.sum() == 0


def test_prologue_post_trains_only_the_prologue_path(tmp_path, tiny_graph):
    from safetensors.torch import load

    from pipelines.loaders import load_tokenizer

    store = copy_store(tiny_graph.root, Store(str(tmp_path)), ("image_shards", "tokenizer"))
    plan = tiny_plan(store, ["variants=baseline,prologue_post"])
    post = train_tokenizer(plan, "prologue_post", progress=False)
    base = train_tokenizer(plan, "baseline", progress=False)
    assert base.cached and post.manifest.lineage["tokenizer/baseline"] == base.artifact.key
    base_w = load(base.artifact.read_bytes("model/tokenizer.safetensors"))
    post_w = load(post.artifact.read_bytes("model/tokenizer.safetensors"))
    for name, tensor in base_w.items():  # the whole 2D tokenizer is unchanged, bit for bit
        assert torch.equal(post_w[name], tensor), name
    new = set(post_w) - set(base_w)
    assert new and all(k.startswith(("prologue_encoder.", "prologue_quantizer.")) for k in new)
    m_base, m_post = base.manifest.metrics, post.manifest.metrics
    assert m_post["psnr_db"] == pytest.approx(m_base["psnr_db"], abs=1e-4)  # same visual codes, same decoder
    assert m_post["prologue_codes"]["fraction_used"] > 0
    history = [json.loads(line) for line in post.artifact.read_bytes("history.jsonl").decode().splitlines()]
    assert history[-1]["prior_ce_visual"] < history[0]["prior_ce_visual"]  # the prior learns on top
    tok = load_tokenizer(post.artifact)  # a tokenizer artefact like any other, downstream steps load it
    assert tok.cfg.post_hoc and tok.prologue_encoder is not None
    trainable = post.manifest.metrics["trainable_parameters"]
    assert trainable == sum(v.numel() for k, v in post_w.items() if k.startswith(("prologue_encoder.", "prologue_q")))
