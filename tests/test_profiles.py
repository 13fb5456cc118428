"""Profiles: typed, validated, every field documented; errors name the field."""

import dataclasses
import json

import pytest

from modeling.config import ConfigError, field_docs, key_dict, to_dict
from pipelines.profiles import PROFILES, DataConfig, Profile, SourceConfig, load_profile


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_named_profiles_load(name):
    p = load_profile(name)
    assert p.name == name and p.version >= 1 and p.description
    assert p.data.train.split == "train" and p.data.val.split == "val"


def test_partial_override_keeps_nested_defaults():
    p = load_profile("tiny", {"data": {"val": {"limit": 7}}})
    assert p.data.val == SourceConfig(split="val", limit=7)
    assert load_profile("tiny", ["data.workers=3", "data.train.url=/x"]).data.workers == 3


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.shard_sise=10"], "data.shard_sise: unknown field"),
        (["data.shard_size=ten"], "data.shard_size: expected int, got 'ten'"),
        (["data.shard_size=0"], "data.shard_size: must be >= 1"),
        (["data.train.kind=rar"], "data.train.kind: 'rar' is not one of"),
        (["data.val.kind=ilsvrc_tar"], "data.val.split: ilsvrc_tar holds only the train split"),
        (["data.resize=stretch"], "data.resize: 'stretch' is not one of"),
        (["bogus=1"], "bogus: unknown field"),
        (["noequals"], "expected dotted.field=value"),
        (["data.resolution=64"], "tokenizer.image_size: 32 differs from data.resolution 64"),
        (["tokenizer.patch_size=5"], "tokenizer.patch_size: 5 does not divide image_size 32"),
        (["variants=baseline,prolog"], "variants: variant: 'prolog' is not <arm>"),
        (["variants=baseline,baseline"], "variants: need one or more distinct names"),
        (["evaluation.sampling_runs=0"], "evaluation.sampling_runs: must be >= 1"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_profile("fashion32", overrides)


def test_unknown_profile_and_json_profiles(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_profile("nope")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "data": {"resolution": 64, "resize": "center_crop"},
                                "tokenizer": {"image_size": 64}}))
    p = load_profile(str(path))
    assert p.name == "mine" and p.data.resolution == 64 and p.data.train.kind == "idx"


@pytest.mark.parametrize("cls", [Profile, DataConfig, SourceConfig])
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    assert set(docs) == {f.name for f in dataclasses.fields(cls)}
    assert all(len(d) > 10 for d in docs.values())


def test_variants_map_to_tokenizer_configs_and_full_shares_fashion32():
    p = load_profile("tiny", ["variants=baseline,prologue,prologue_post,prologue_z8"])
    assert p.variants == ["baseline", "prologue", "prologue_post", "prologue_z8"]
    assert p.tokenizer_for("baseline").z_len == 0 and p.tokenizer_for("prologue_z8").z_len == 8
    post = p.tokenizer_for("prologue_post")
    assert post.post_hoc and post.z_len == p.tokenizer.z_len
    with pytest.raises(ConfigError, match="not one of this profile's"):
        load_profile("tiny").tokenizer_for("prologue_post")
    full, demo, ablations = (load_profile(n) for n in ("fashion32-full", "fashion32", "fashion32-ablations"))
    # fashion32's settings but 3x the tokenizer's steps (the GAN start with them, the warm-up kept)
    assert (full.data, full.tokenizer, full.tokens, full.ar_train, full.sampler) == (
        demo.data, demo.tokenizer, demo.tokens, demo.ar_train, demo.sampler
    )
    three_x = dataclasses.replace(demo.tokenizer_train, steps=3 * demo.tokenizer_train.steps,
                                  gan_start=3 * demo.tokenizer_train.gan_start)  # fmt: skip
    assert full.tokenizer_train == three_x and full.tokenizer_train.warmup_steps == demo.tokenizer_train.warmup_steps
    # the ablations stay at fashion32's budget: their `_tok3x` rows train what fashion32-full's arms train
    assert ablations.tokenizer_train == demo.tokenizer_train
    assert ablations.tokenizer_train_for("prologue_s1_tok3x") == full.tokenizer_train_for("prologue_s1")
    assert full.evaluation.sampling_runs == 3 and "prologue_post" in full.variants


def test_cache_key_input_leaves_out_what_does_not_change_the_result():
    p = load_profile("tiny")
    train = key_dict(p.tokenizer_train)
    assert not {"log_every", "checkpoint_every", "loader_workers"} & set(train)
    assert "steps" in train and "processes" in train  # the global batch depends on processes
    assert key_dict(load_profile("tiny", ["tokenizer_train.log_every=1"]).tokenizer_train) == train
    ar = key_dict(p.ar_train)
    assert not {"log_every", "checkpoint_every"} & set(ar) and "loader_workers" in ar
    assert not {"processes", "batch_size", "sanity_images", "sanity_tolerance_db"} & set(key_dict(p.tokens))
    assert to_dict(p.tokens)["processes"] == p.tokens.processes  # workers still get every field
    # post_hoc came after tokenizers were stored: at its default it stays out, so their keys hold
    assert "post_hoc" not in key_dict(p.tokenizer)
    assert key_dict(dataclasses.replace(p.tokenizer, post_hoc=True))["post_hoc"] is True


def test_imagenet256_l_builds_prologue_l_and_ar_xl_on_the_meta_device():
    """The paper's Large setting, built without allocating it: Prologue-L's 4096 visual codes and
    24 x 1024 decoder beside imagenet256-b's encoder, its ConvNeXt-S perceptual loss, and AR-XL."""
    import torch

    from modeling.ar_model import ARModel
    from modeling.ar_trainer import model_config
    from modeling.tokenizer import Tokenizer

    large, base = load_profile("imagenet256-l"), load_profile("imagenet256-b")
    cfg = large.tokenizer_for("prologue")
    assert (cfg.visual_codebook, cfg.dec_depth, cfg.dec_width, cfg.z_len) == (4096, 24, 1024, 16)
    assert (cfg.width, cfg.depth) == (base.tokenizer.width, base.tokenizer.depth) == (768, 12)
    train = large.tokenizer_train_for("prologue")
    assert train.perceptual_net == "convnext_s_logits" and train.perceptual_weight > 0
    with torch.device("meta"):
        tokenizer = Tokenizer(cfg)
        codes = {"z_len": 16, "num_visual": 256, "visual_codebook": 4096, "prologue_codebook": 1024}
        ar = ARModel(model_config(large.ar_train, codes, 1000))
    decoder = sum(p.numel() for p in tokenizer.decoder.parameters())
    assert 380e6 < decoder < 420e6, decoder  # 24 GEGLU blocks of width 1024, ~16.8M each
    # AR-XL, 1280 x 32: 853M here, the paper's is 685M. Our blocks' GEGLU MLP is 4x the width wide
    # (16 d^2 per block) where LlamaGen's SwiGLU is 8/3x (12 d^2): the README says so
    assert 840e6 < ar.num_params() < 870e6, ar.num_params()


def test_a_step_command_with_a_config_mistake_says_one_line_and_does_nothing(tmp_path, capsys):
    from pipelines import train_tokenizer

    store = tmp_path / "store"
    for argv, field in ((["--profile", "nope"], "unknown profile 'nope'"),
                        (["--profile", "tiny", "--set", "evaluation.sampling_runs=0"], "evaluation.sampling_runs")):  # fmt: skip
        assert train_tokenizer.main([*argv, "--store", str(store)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and field in err and "Traceback" not in err
    assert not store.exists()  # nothing was written
