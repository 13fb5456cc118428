"""Named, versioned experiment profiles.

A profile is a `Profile` dataclass; the named ones below are overrides on its defaults. Load one
with `load_profile("fashion32", ["data.shard_size=1000"])`, or from a JSON file path. A wrong field
or value fails here, before any work starts, with a `ConfigError` that names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modeling.ar_model import AR_SIZES
from modeling.ar_trainer import ARTrainConfig
from modeling.config import NOT_IN_KEY, Config, ConfigError, from_dict, merge, parse_overrides
from modeling.domain_classifier import DomainClassifierConfig
from modeling.sampler import SamplerConfig
from modeling.tokenizer import TokenizerConfig
from modeling.tokenizer_trainer import TokenizerTrainConfig
from pipelines.variants import Variant, parse_variant

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SOURCE_KINDS = ("idx", "folder", "ilsvrc_tar", "kaggle_zip")
SPLITS = ("train", "val")
VARIANTS = ("baseline", "prologue")  # the default comparison; a profile may list more (pipelines/variants.py)


@dataclass
class SourceConfig(Config):
    kind: str = "idx"
    """Layout of the raw images: idx (MNIST-style files), folder (<url>/<split>/<class>/<img>),
    ilsvrc_tar (ILSVRC2012 train tar of per-class tars) or kaggle_zip (Kaggle ImageNet zip)."""
    url: str = FASHION_MNIST_DIR
    """fsspec URL of the folder, tar or zip (local path, file://, s3://bucket/key, ...)."""
    split: str = "train"
    """Which part of the source to read: train or val (idx: val means the t10k files)."""
    limit: int = 0
    """Keep only the first N images of the source's stable order (0 keeps all)."""

    def validate(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"kind: {self.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        if not self.url:
            raise ConfigError("url: must not be empty")
        if self.split not in SPLITS:
            raise ConfigError(f"split: {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.kind == "ilsvrc_tar" and self.split != "train":
            raise ConfigError("split: ilsvrc_tar holds only the train split; use folder or kaggle_zip for val")
        if self.limit < 0:
            raise ConfigError(f"limit: must be >= 0, got {self.limit}")


@dataclass
class DataConfig(Config):
    train: SourceConfig = field(default_factory=SourceConfig)
    """Where the training images come from."""
    val: SourceConfig = field(default_factory=lambda: SourceConfig(split="val"))
    """Where the validation images come from."""
    resolution: int = 32
    """Side of the square images written to the shards, in pixels."""
    resize: str = "pad"
    """How images reach `resolution`: pad (centre on black; images must not be larger) or
    center_crop (crop the central square, then bicubic resize)."""
    shard_size: int = 5000
    """Images per WebDataset tar shard."""
    workers: int = 2
    """Parallel worker processes writing shards (1 = in-process)."""
    preview: int = 64
    """Images in the preview grid shown in the Dagster UI."""

    def validate(self) -> None:
        if not 8 <= self.resolution <= 1024:
            raise ConfigError(f"resolution: must be in 8..1024, got {self.resolution}")
        if self.resize not in ("pad", "center_crop"):
            raise ConfigError(f"resize: {self.resize!r} is not one of pad, center_crop")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be >= 1, got {self.shard_size}")
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")
        if not 0 <= self.preview <= 256:
            raise ConfigError(f"preview: must be in 0..256, got {self.preview}")

    def source(self, split: str) -> SourceConfig:
        if split not in SPLITS:
            raise ConfigError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
        return self.train if split == "train" else self.val


AUGMENTATIONS = ("none", "flip", "tencrop_flip")


@dataclass
class TokenExportConfig(Config):
    augment: str = "flip"
    """Views of each training image, one row each: none, flip (original + mirror) or tencrop_flip
    (4 corner + centre crops of the image enlarged by crop_scale, each also mirrored). Val: none."""
    crop_scale: float = 1.125
    """tencrop_flip: the image is resized to round(resolution * crop_scale) before cropping."""
    rows_per_group: int = 4096
    """Rows per Parquet row group and per WebDataset block: the unit a streaming reader fetches."""
    batch_size: int = field(default=256, metadata=NOT_IN_KEY)
    """Images per encoder forward pass."""
    processes: int = field(default=1, metadata=NOT_IN_KEY)
    """Encoding processes (one per GPU); each takes every processes-th input shard."""
    sanity_images: int = field(default=256, metadata=NOT_IN_KEY)
    """Val images decoded before the full encode to compare PSNR with the tokenizer's own figure."""
    sanity_tolerance_db: float = field(default=0.75, metadata=NOT_IN_KEY)
    """Largest accepted |PSNR difference| of the sanity check, in dB."""

    def validate(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment: {self.augment!r} is not one of {', '.join(AUGMENTATIONS)}")
        if not 1.0 < self.crop_scale <= 2.0:
            raise ConfigError(f"crop_scale: must be in (1, 2], got {self.crop_scale}")
        for name in ("rows_per_group", "batch_size", "processes", "sanity_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.sanity_tolerance_db <= 0:
            raise ConfigError(f"sanity_tolerance_db: must be > 0, got {self.sanity_tolerance_db}")


EVALUATORS = ("effnetlite0",)


@dataclass
class EvalConfig(Config):
    samples_per_class: int = 1000
    """Samples per class for each guidance setting (with and without CFG)."""
    sample_shard_size: int = 1000
    """Samples per PNG WebDataset shard (and per resumable sampling task)."""
    processes: int = 1
    """Sampling processes (one per GPU); each takes every processes-th shard."""
    evaluator: str = "effnetlite0"
    """Feature extractor of FD / KID / precision-recall / IS-style scores (EfficientNet-Lite0, offline)."""
    inception_weights: str = ""
    """Local InceptionV3 weights file (torch-fidelity format): adds fid_inception and is_inception."""
    reference_images: int = 0
    """Val images in the reference set of gFD and rFD (0: the whole val split)."""
    feature_batch: int = 100
    """Images per feature-extractor forward pass."""
    probe_steps: int = 300
    """Full-batch L-BFGS iterations of the linear probe (its fixed budget)."""
    sampling_runs: int = 1
    """Independent sample sets per variant (sampler seeds seed, seed+1, ...); generation metrics
    are reported as mean ± std over them when > 1."""
    feature_samples_per_class: int = 0
    """Samples per class of each set that the ImageNet-trained evaluators (EfficientNet-Lite0,
    InceptionV3) embed, ~40 ms an image on CPU (0: all); the domain evaluator reads every sample."""
    domain_holdout_shards: int = 2
    """Train shards kept out of the domain classifier's training: the reference set of every
    fd_domain (images the classifier never saw). The val split is the tuning reference."""
    domain_min_top1: float = 0.9
    """Least val top-1 of the domain classifier that its blocking asset check accepts."""
    mechanism_originals: int = 10
    """Samples per class (no guidance) whose prologue is kept while the visual tokens are redrawn."""
    mechanism_resamples: int = 4
    """Visual redraws per kept prologue in the fixed-prologue resampling measurement."""

    def validate(self) -> None:
        for name in ("samples_per_class", "sample_shard_size", "processes", "feature_batch", "probe_steps",
                     "sampling_runs", "domain_holdout_shards", "mechanism_originals", "mechanism_resamples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.feature_samples_per_class < 0:
            raise ConfigError(f"feature_samples_per_class: must be >= 0, got {self.feature_samples_per_class}")
        if not 0 <= self.domain_min_top1 <= 1:
            raise ConfigError(f"domain_min_top1: must be in [0, 1], got {self.domain_min_top1}")
        if self.evaluator not in EVALUATORS:
            raise ConfigError(f"evaluator: {self.evaluator!r} is not one of {', '.join(EVALUATORS)}")
        if self.inception_weights and not Path(self.inception_weights).is_file():
            raise ConfigError(f"inception_weights: no file at {self.inception_weights}")
        if self.reference_images < 0:
            raise ConfigError(f"reference_images: must be >= 0, got {self.reference_images}")


@dataclass
class TuningConfig(Config):
    samples_per_class: int = 20
    """Samples per class at each grid point (sampler seed `seed`, not the reported samples')."""
    temperatures: list[float] = field(default_factory=lambda: [0.8, 0.9, 1.0])
    """No guidance: prologue variants search T_prologue x T_visual over these; the baseline (no
    prologue positions) searches T_visual over as many evenly spaced values between their min and max,
    so that every variant gets a grid of the same size."""
    cfg_prologue: list[float] = field(default_factory=lambda: [0.6, 0.7, 0.8])
    """Guidance, prologue variants: constant scale on the prologue positions (x cfg_visual_max)."""
    cfg_visual_max: list[float] = field(default_factory=lambda: [1.5, 2.5, 3.5])
    """Guidance: s_max of the visual cosine ramp (prologue variants: x cfg_prologue; the baseline:
    x cfg_power, the same number of points)."""
    cfg_power: list[float] = field(default_factory=lambda: [0.2, 1.0, 1.5])
    """Guidance, the baseline: exponent p of the visual ramp (x cfg_visual_max)."""
    seed: int = 1000
    """Sampler seed of the tuning samples."""

    def validate(self) -> None:
        if self.samples_per_class < 1:
            raise ConfigError(f"samples_per_class: must be >= 1, got {self.samples_per_class}")
        for name in ("temperatures", "cfg_prologue", "cfg_visual_max", "cfg_power"):
            values = getattr(self, name)
            if not values or any(v <= 0 for v in values):
                raise ConfigError(f"{name}: need one or more values > 0, got {values}")
        if len(self.cfg_prologue) != len(self.cfg_power):
            raise ConfigError(
                f"cfg_power: {len(self.cfg_power)} values, cfg_prologue {len(self.cfg_prologue)}: the baseline's "
                "guidance grid (s_max x power) must be as large as the prologue variants' (cfg_prologue x s_max)"
            )


@dataclass
class OperationsConfig(Config):
    retrain_cron: str = "0 3 * * 0"
    """Cron of the schedule that reruns the whole graph (starts stopped: switch it on in the UI)."""
    watch_interval_s: int = 300
    """Seconds between two listings of the source by the new-data sensor."""
    codebook_usage_floor: float = 0.25
    """Least fraction of each tokenizer codebook used on val images that the usage check accepts."""

    def validate(self) -> None:
        fields = self.retrain_cron.split()
        if len(fields) != 5:
            raise ConfigError(f"retrain_cron: expected 5 cron fields, got {self.retrain_cron!r}")
        if self.watch_interval_s < 30:
            raise ConfigError(f"watch_interval_s: must be >= 30, got {self.watch_interval_s}")
        if not 0.0 <= self.codebook_usage_floor <= 1.0:
            raise ConfigError(f"codebook_usage_floor: must be in [0, 1], got {self.codebook_usage_floor}")


@dataclass
class Profile(Config):
    name: str = "custom"
    """Profile name, recorded in every manifest."""
    version: int = 1
    """Bumped whenever a named profile's settings change."""
    description: str = ""
    """One line on what the profile is for."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """Arms compared (partitions of every variant asset): baseline, prologue, prologue_post
    (Prologue-Post), with optional suffixes _z<N>, _s<S>, _ent<W>, _tok<K>x, _ar<K>x (pipelines/variants.py)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Raw images and sharding."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Stage-1 tokenizer of the prologue variant (the baseline is the same with z_len = 0)."""
    tokenizer_train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    """Stage-1 training schedule, losses and checkpointing."""
    tokens: TokenExportConfig = field(default_factory=TokenExportConfig)
    """Stage-2 export of the pre-tokenised dataset."""
    ar_train: ARTrainConfig = field(default_factory=ARTrainConfig)
    """Stage-3 AR model size, DeepSpeed training schedule and checkpointing."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Sampling: guidance schedule, temperatures, top-k/top-p, batch and run seed."""
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation protocol: sample counts, evaluator, reference set, linear probe budget."""
    tuning: TuningConfig = field(default_factory=TuningConfig)
    """Sampling settings searched per variant (same grid size for every variant), selected by
    FD-domain against the val split (disjoint from the reporting reference)."""
    domain: DomainClassifierConfig = field(default_factory=DomainClassifierConfig)
    """The domain evaluator: a small classifier of the data set's classes trained on its train shards."""
    operations: OperationsConfig = field(default_factory=OperationsConfig)
    """Automation and integrity checks: retraining schedule, new-data sensor, check thresholds."""

    def validate(self) -> None:
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"variants: need one or more distinct names, got {self.variants}")
        for v in self.variants:
            try:
                variant = parse_variant(v)
            except ConfigError as e:
                raise ConfigError(f"variants: {e}") from None
            base = variant.base_variant  # listed first: a run covering every variant trains them in order
            if base is not None and base not in self.variants[: self.variants.index(v)]:
                raise ConfigError(f"variants: {v} trains on the 2D tokenizer of {base}; list {base} before it")
        shards = -(-self.data.train.limit // self.data.shard_size) if self.data.train.limit else None
        if shards is not None and self.evaluation.domain_holdout_shards >= shards:
            raise ConfigError(
                f"evaluation.domain_holdout_shards: {self.evaluation.domain_holdout_shards} of the "
                f"{shards} train shards leaves the domain classifier nothing to train on"
            )
        if self.tokenizer.image_size != self.data.resolution:
            raise ConfigError(
                f"tokenizer.image_size: {self.tokenizer.image_size} differs from data.resolution "
                f"{self.data.resolution}; set both"
            )

    def variant(self, name: str) -> Variant:
        """One of the profile's variants, parsed."""
        if name not in self.variants:
            raise ConfigError(f"variant: {name!r} is not one of this profile's {', '.join(self.variants)}")
        return parse_variant(name)

    def tokenizer_for(self, variant: str) -> TokenizerConfig:
        """The tokenizer config of one of the profile's variants (Prologue-OneStage: its joint prior has
        the AR model's size; the plan sets its classes from the source)."""
        v = self.variant(variant)
        cfg = v.tokenizer(self.tokenizer)
        if v.ar_is_joint_prior:
            size = AR_SIZES[self.ar_train.size]
            cfg = replace(cfg, prior_width=size["width"], prior_depth=size["depth"], prior_heads=size["heads"],
                          prior_label_dropout=self.ar_train.label_dropout)  # fmt: skip
        return cfg

    def tokenizer_train_for(self, variant: str) -> TokenizerTrainConfig:
        """The tokenizer training settings of one of the profile's variants."""
        return self.variant(variant).tokenizer_train(self.tokenizer_train)

    def ar_train_for(self, variant: str) -> ARTrainConfig:
        """The AR training settings of one of the profile's variants."""
        return self.variant(variant).ar_train(self.ar_train)


PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {
        "version": 2,
        "description": "seconds on 2 cores: a slice of Fashion-MNIST, for tests",
        # 30 tokenizer steps leave the codebooks barely warmed up: the usage check only catches collapse
        "operations": {"codebook_usage_floor": 0.1},
        "data": {
            "train": {"limit": 512},
            "val": {"limit": 128},
            "shard_size": 128,
            "preview": 16,
        },
        "tokenizer": {
            "patch_size": 8,
            "width": 32,
            "depth": 1,
            "heads": 2,
            "dec_width": 32,
            "dec_depth": 1,
            "dec_heads": 2,
            "visual_codebook": 64,
            "z_len": 2,
            "prologue_codebook": 16,
            "prior_width": 32,
            "prior_depth": 1,
            "prior_heads": 2,
            "post_width": 32,
            "post_depth": 1,
            "post_heads": 2,
        },
        "tokenizer_train": {
            "steps": 30,
            "batch_size": 16,
            "lr": 1e-3,
            "aux_lr": 1e-3,
            "warmup_steps": 5,
            "gan_start": 15,
            "checkpoint_every": 10,
            "log_every": 5,
            "eval_images": 128,
            "shuffle_buffer": 100,
            "loader_workers": 0,
        },
        "tokens": {"rows_per_group": 64, "batch_size": 64, "sanity_images": 128},
        "ar_train": {
            "size": "tiny",
            "steps": 40,
            "batch_size": 16,
            "lr": 1e-3,
            "warmup_steps": 5,
            "ema_decay": 0.99,
            "checkpoint_every": 20,
            "log_every": 5,
            "loader_workers": 0,
            "shuffle_rows": 256,
        },
        "sampler": {"batch_size": 64},
        # 384 training images, seconds of training: ~73 % val top-1, enough to check the plumbing;
        # EfficientNet embeds 4 of each class's 12 samples (the domain evaluator all 12)
        "evaluation": {"samples_per_class": 12, "sample_shard_size": 8, "probe_steps": 50,
                       "feature_samples_per_class": 4, "domain_holdout_shards": 1, "domain_min_top1": 0.5},
        "domain": {"width": 8, "feature_dim": 32, "epochs": 10, "batch_size": 32},
        "tuning": {"samples_per_class": 2, "temperatures": [0.9, 1.0], "cfg_prologue": [0.7, 0.8],
                   "cfg_visual_max": [1.5, 2.5], "cfg_power": [0.2, 1.0]},
    },
    "fashion32": {
        "version": 3,
        "description": "the default demo: all of Fashion-MNIST padded to 32x32 RGB",
        "data": {"shard_size": 5000},
        "tokenizer": {
            "patch_size": 4,
            "width": 96,
            "depth": 3,
            "heads": 4,
            "dec_width": 96,
            "dec_depth": 3,
            "dec_heads": 4,
            "visual_codebook": 512,
            "z_len": 4,
            "prologue_codebook": 64,
            "prior_width": 96,
            "prior_depth": 2,
            "prior_heads": 4,
            "post_width": 64,
            "post_depth": 3,
            "post_heads": 4,
        },
        "tokenizer_train": {
            "steps": 1500,
            "batch_size": 32,
            "restart_dead_codes_every": 100,
            "prologue_entropy_weight": 0.5,
            "warmup_steps": 100,
            "gan_start": 750,
            "checkpoint_every": 250,
            "log_every": 25,
            "eval_images": 2000,
        },
        # 3 epochs over the 50,000 train images outside the held-out reference: ~91 % val top-1
        "domain": {"epochs": 3},
        "ar_train": {"size": "fashion32", "steps": 800, "batch_size": 64, "ema_decay": 0.995, "checkpoint_every": 200},
        # EfficientNet-Lite0 at 224x224 embeds ~25 images/s on 2 CPU cores: small evaluation sets here
        "evaluation": {"samples_per_class": 100, "sample_shard_size": 100, "reference_images": 1000},
    },
    "imagenet256-b": {
        "version": 2,
        "description": "the paper's Base setting on ImageNet 256 (GPU cluster; set data.*.url)",
        "data": {
            "train": {"kind": "folder", "url": "/data/imagenet"},
            "val": {"kind": "folder", "url": "/data/imagenet"},
            "resolution": 256,
            "resize": "center_crop",
            "shard_size": 5000,
            "workers": 16,
        },
        "tokenizer": {
            "image_size": 256,
            "patch_size": 16,
            "width": 768,
            "depth": 12,
            "heads": 12,
            "dec_width": 768,
            "dec_depth": 12,
            "dec_heads": 12,
            "code_dim": 14,
            "visual_codebook": 16384,
            "z_len": 16,
            "prologue_codebook": 1024,
            "prior_width": 512,
            "prior_depth": 7,
            "prior_heads": 8,
            "post_width": 512,
            "post_depth": 10,
            "post_heads": 8,
        },
        "tokenizer_train": {
            "steps": 500000,
            "batch_size": 32,
            "processes": 8,
            "lr": 1e-4,
            "aux_lr": 1e-4,
            "warmup_steps": 5000,
            "gan_start": 100000,
            "checkpoint_every": 5000,
            "log_every": 100,
            "eval_images": 50000,
            "loader_workers": 8,
        },
        "tokens": {"augment": "tencrop_flip", "batch_size": 512, "processes": 8},
        # a small CNN at 256x256 is a weak evaluator of ImageNet: reported, not gated (InceptionV3 is the reference)
        "evaluation": {"samples_per_class": 50, "sample_shard_size": 50, "processes": 8, "feature_batch": 250,
                       "domain_min_top1": 0.0},
        "ar_train": {
            "size": "B",
            "steps": 500000,
            "batch_size": 256,
            "processes": 8,
            "warmup_steps": 5000,
            "checkpoint_every": 5000,
            "log_every": 100,
            "loader_workers": 4,
            "zero_stage": 1,
        },
    },
}


# The paper's Large setting: Prologue-L (4096 visual codes, an asymmetric 24 x 1024 decoder, a perceptual
# loss on ConvNeXt-S logits) with AR-XL; everything else as imagenet256-b. The perceptual weight (1.0)
# is ours: method.md does not give the paper's.
PROFILES["imagenet256-l"] = merge(
    PROFILES["imagenet256-b"],
    {
        "version": 1,
        "description": "the paper's Large setting, Prologue-L + AR-XL, on ImageNet 256 (GPU cluster; set "
        "data.*.url and tokenizer_train.perceptual_weights)",
        "tokenizer": {"visual_codebook": 4096, "dec_width": 1024, "dec_depth": 24, "dec_heads": 16},
        "tokenizer_train": {"perceptual_weight": 1.0, "perceptual_net": "convnext_s_logits",
                            "perceptual_weights": "/models/convnext_small.pth"},
        "ar_train": {"size": "XL"},
    },
)


# The small-scale reproduction of the paper's comparison: fashion32's settings with 3x its tokenizer steps
# (4,500; the GAN start moves with them, the warm-up stays), plus Prologue-Post, the prologue variant with
# 2 and 8 prologue tokens, the 1D-tokenizer baseline, Prologue-OneStage, a second training seed of the
# baseline and the prologue (the spread over training), and three sampling runs per variant (the spread over
# sampling). 3x, because at fashion32's 1,500 steps the baseline's codes are as easy for the AR as the
# prologue's and no arm generates better; at 4,500 the prologue does, over two training seeds per arm
# (fashion32-ablations' `_tok3x` rows, which train what these arms train; the variant's name is in the
# cache key, so they are separate artefacts).
PROFILES["fashion32-full"] = merge(
    PROFILES["fashion32"],
    {
        "version": 3,
        "description": "the paper's comparison at small scale: fashion32 with 3x tokenizer steps + Prologue-Post + "
        "z_len 2/8 + the 1D tokenizer + Prologue-OneStage + a second training seed, 3 sampling runs",
        "variants": ["baseline", "prologue", "prologue_post", "prologue_z2", "prologue_z8", "baseline_1d",
                     "prologue_onestage", "baseline_s1", "prologue_s1"],
        "tokenizer_train": {k: 3 * PROFILES["fashion32"]["tokenizer_train"][k] for k in ("steps", "gan_start")},
        # 10,000 samples per set for the domain evaluator; EfficientNet-Lite0 embeds the first 1,000
        "evaluation": {"sampling_runs": 3, "samples_per_class": 1000, "feature_samples_per_class": 100},
    },
)

# Ablations that say why (issue 16), at fashion32's tokenizer budget (1,500 steps; fashion32-full's is 3x):
# the prologue entropy loss (0, 0.1 and fashion32's 0.5), the AR budget (1x and 4x steps) for the baseline
# and Prologue-Post (identical visual codes: a gap is the prologue's), the tokenizer budget (1x and 3x steps)
# for the baseline and the prologue, each with a second training seed. fashion32-full's evaluation: its
# domain classifier and sample counts score every row, so each gap reads against the same training-seed
# spread; the `_tok3x` rows train what fashion32-full's baseline and prologue arms train.
PROFILES["fashion32-ablations"] = merge(
    PROFILES["fashion32-full"],
    {
        "version": 3,
        "description": "why: prologue entropy 0/0.1/0.5, AR budget 1x/4x, tokenizer budget 1x/3x, at fashion32's "
        "tokenizer budget with fashion32-full's seeds and evaluation",
        "tokenizer_train": {k: PROFILES["fashion32"]["tokenizer_train"][k] for k in ("steps", "gan_start")},
        "variants": ["baseline", "baseline_s1", "prologue", "prologue_s1", "prologue_ent0", "prologue_ent0p1",
                     "prologue_post", "baseline_ar4x", "prologue_post_ar4x", "baseline_tok3x", "baseline_s1_tok3x",
                     "prologue_tok3x", "prologue_s1_tok3x"],
    },
)


# The ablations one at a time, each a subset of fashion32-ablations' rows (the same cache keys, so any of
# these stores serves the others) that one run of about 2.5 h on 2 cores finishes: the AR budget (the
# baseline and Prologue-Post at 1x and 4x AR steps, one training seed each: their training-seed spread is
# that of the 1x seed arms, in fashion32-ablations or fashion32-full@2's table) and the prologue entropy loss (0,
# 0.1 and 0.5 with its second seed, the spread).
for _name, _description, _variants in (
    ("fashion32-ar-budget", "why, part 1: the AR budget (1x/4x steps) for the baseline and Prologue-Post",
     ["baseline", "prologue_post", "baseline_ar4x", "prologue_post_ar4x"]),
    ("fashion32-entropy", "why, part 2: the prologue entropy loss at 0, 0.1 and 0.5 (two training seeds)",
     ["prologue", "prologue_s1", "prologue_ent0", "prologue_ent0p1"]),
):  # fmt: skip
    PROFILES[_name] = merge(
        PROFILES["fashion32-ablations"],
        {"version": 1, "description": f"{_description}, at fashion32-ablations' settings", "variants": _variants},
    )


def load_profile(name_or_path: str, overrides: list[str] | dict[str, Any] | None = None) -> Profile:
    """A named profile (or a JSON file of one) with dotted `field=value` overrides applied."""
    if name_or_path in PROFILES:
        raw = merge({"name": name_or_path}, PROFILES[name_or_path])
    elif name_or_path.endswith(".json") and Path(name_or_path).is_file():
        raw = json.loads(Path(name_or_path).read_text())
    else:
        raise ConfigError(f"profile: unknown profile {name_or_path!r} (known: {', '.join(PROFILES)})")
    if overrides:
        raw = merge(raw, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return from_dict(Profile, raw)
