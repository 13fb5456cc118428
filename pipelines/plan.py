"""The plan: every artefact of a profile, its cache key and its inputs, computed in one place.

A `Plan` is built from a profile, a store and one `Listing` of the raw source (its fingerprint per
split and its class names: the only thing read from outside the store). From those it derives the
cache key of every artefact the asset graph materialises, without running anything:

    image_shards[split] -> tokenizer[variant] -> token_dataset[variant] -> ar_model[variant]
    -> sampling_tuning[variant] -> samples[variant] (one set per sampling run);
    reference_stats[evaluator] from image_shards[val]; domain_classifier from image_shards[train, val];
    reconstruction_metrics / generation_metrics / linear_probe / mechanism_metrics[variant]; results_table.

A step gets its own `Target` and its inputs' targets from the plan and never calls another step;
`Target.require()` fails at once, naming the asset and partition to materialise first, when an
input is missing. `pipelines.runner` runs a plan's missing steps in order (the standalone CLI).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from modeling.ar_trainer import model_config
from modeling.config import key_dict, to_dict
from pipelines.manifests import Manifest, parse
from pipelines.profiles import SPLITS, DataConfig, Profile
from pipelines.store import Artifact, StepResult, Store, cache_key

log = logging.getLogger(__name__)

# Bump an asset's code version whenever the bytes it writes for the same config would change.
CODE_VERSIONS = {
    "image_shards": "1",
    "tokenizer": "2",  # 2: the discriminator's own optimiser and schedule; Post's separate prologue encoder
    "token_dataset": "1",
    "ar_model": "1",
    "sampling_tuning": "2",  # 2: the selected settings' labels in the metrics
    "samples": "2",  # 2: sampled with the settings sampling_tuning selected
    "reference_stats": "2",  # 2: EfficientNet-Lite0 with its BatchNorms folded (the same features up to rounding)
    "domain_classifier": "1",
    # 3: EfficientNet-Lite0 with its BatchNorms folded; 2: the domain evaluator's figures beside EfficientNet-Lite0's
    "reconstruction_metrics": "3",
    "generation_metrics": "3",  # 3: EfficientNet-Lite0's BatchNorms folded; 2: fd_domain, consistency, AR-only
    # 3: one-hot views gathered, not a dense matrix (the same fit up to rounding); 2: one-hot views beside the
    # codebook vectors, the first z visual tokens per variant
    "linear_probe": "3",
    "mechanism_metrics": "1",
    # 9: one spread for every gap (pooled seed std x sqrt(1/n + 1/m)); 8: codebook usage; 7: other seeds in
    # budgets.png; 6: one-setting gaps; 5: input machines; 4: step times
    "results_table": "9",
}


class MissingInput(RuntimeError):
    """An input artefact of a step is not in the store: its asset and partition must be materialised first."""


@dataclass(frozen=True)
class SourceListing:
    """One split of the raw source as listed: where it is and the fingerprint of what was there."""

    kind: str
    url: str
    split: str
    fingerprint: str


@dataclass
class Listing:
    """The raw source listed once: a fingerprint per split and the class names. The opened sources
    are kept (not serialised) so that the sharding step reads what was listed."""

    splits: dict[str, SourceListing]
    classes: list[str]
    sources: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"splits": {s: dataclasses.asdict(v) for s, v in self.splits.items()}, "classes": self.classes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Listing:
        return cls({s: SourceListing(**v) for s, v in data["splits"].items()}, list(data["classes"]))

    def matches(self, data: DataConfig) -> bool:
        """Whether this listing is of the source the data config names (kind, url, split)."""
        return all(
            s in self.splits
            and (self.splits[s].kind, self.splits[s].url, self.splits[s].split)
            == (data.source(s).kind, data.source(s).url, data.source(s).split)
            for s in SPLITS
        )


def list_source(data: DataConfig) -> Listing:
    """List (index and fingerprint) both splits of the profile's raw source."""
    from pipelines.sources import open_source

    splits, sources = {}, {}
    for split in SPLITS:
        cfg = data.source(split)
        sources[split] = open_source(cfg.kind, cfg.url, cfg.split)
        splits[split] = SourceListing(cfg.kind, cfg.url, cfg.split, sources[split].fingerprint())
    return Listing(splits, list(sources["train"].classes), sources)


@dataclass(frozen=True)
class Target:
    """One artefact of the plan: asset, partition, the config and input keys its cache key hashes."""

    asset: str
    partition: str | None
    config: dict[str, Any]
    inputs: dict[str, str]
    artifact: Artifact

    @property
    def key(self) -> str:
        return self.artifact.key

    @property
    def label(self) -> str:
        """How the asset graph names it: `token_dataset[prologue]`, `results_table`."""
        return f"{self.asset}[{self.partition}]" if self.partition is not None else self.asset

    def manifest(self) -> dict[str, Any] | None:
        return self.artifact.manifest()

    def require(self) -> Manifest:
        """The typed manifest of this input, or a `MissingInput` naming what to materialise."""
        manifest = self.artifact.manifest()
        if manifest is None:
            raise MissingInput(
                f"{self.label} is not materialised in {self.artifact.store.url} (cache key {self.key}): "
                f"materialise {self.label} first"
            )
        return parse(manifest)


def cached_or_run(target: Target, work: Callable[[], dict[str, Any]], on_log: Callable[[str], None]) -> StepResult:
    """The skeleton of every step: return the stored artefact if its manifest exists, else run `work`
    (which writes the files and commits the manifest, returning it); the manifest comes back typed."""
    start = time.perf_counter()
    manifest = target.manifest()
    if manifest is not None:
        on_log(f"{target.label} already materialised at {target.artifact.uri}")
        return StepResult(target.artifact, parse(manifest), True, time.perf_counter() - start)
    target.artifact.begin()
    manifest = work()
    return StepResult(target.artifact, parse(manifest), False, time.perf_counter() - start)


def _target(store: Store, asset: str, partition: str | None, config: dict, inputs: dict[str, str]) -> Target:
    key = cache_key(asset, CODE_VERSIONS[asset], config, inputs)
    return Target(asset, partition, config, inputs, store.artifact(asset, key))


class Plan:
    """Every artefact's target for one profile, store and source listing."""

    def __init__(self, profile: Profile, store: Store, listing: Listing):
        self.profile, self.store, self.listing = profile, store, listing

    @classmethod
    def from_listing(cls, profile: Profile, store: Store) -> Plan:
        """A plan over the source as it is now (lists it: one listing per split)."""
        return cls(profile, store, list_source(profile.data))

    @property
    def label(self) -> str:
        return f"{self.profile.name}@{self.profile.version}"

    # -- data ------------------------------------------------------------------------------------
    def shards(self, split: str) -> Target:
        data = self.profile.data
        config = {
            "split": split,
            "source": to_dict(data.source(split)),
            "resolution": data.resolution,
            "resize": data.resize,
            "shard_size": data.shard_size,
            "preview": data.preview,
        }
        fingerprint = self.listing.splits[split].fingerprint
        return _target(self.store, "image_shards", split, config, {"raw_images": fingerprint})

    # -- stage 1 and 2 -----------------------------------------------------------------------------
    def tokenizer(self, variant: str) -> Target:
        """The variant's tokenizer: that of its `tokenizer_variant` (an AR-budget variant shares it)."""
        v = self.profile.variant(variant)
        model = self.profile.tokenizer_for(variant)
        if v.ar_is_joint_prior:  # Prologue-OneStage: a class-conditional joint prior over the source's classes
            model = replace(model, prior_classes=len(self.listing.classes))
        # the separate prologue encoder's size is Prologue-Post's alone: it keys no other variant
        model_key = {k: x for k, x in key_dict(model).items() if model.post_hoc or not k.startswith("post_")}
        train = key_dict(v.tokenizer_train(self.profile.tokenizer_train))
        config = {"variant": v.tokenizer_variant, "model": model_key, "train": train}
        inputs = {f"image_shards/{s}": self.shards(s).key for s in SPLITS}
        if v.base_variant is not None:  # Prologue-Post: the prologue path is trained on the trained 2D tokenizer
            inputs["tokenizer/baseline"] = self.tokenizer(v.base_variant).key
        return _target(self.store, "tokenizer", variant, config, inputs)

    def base_tokenizer(self, variant: str) -> Target | None:
        """The frozen 2D tokenizer a Prologue-Post variant trains on, else None."""
        base = self.profile.variant(variant).base_variant
        return self.tokenizer(base) if base is not None else None

    def tokens(self, variant: str) -> Target:
        tok = self.tokenizer(variant)
        config = {"variant": tok.config["variant"], "tokens": key_dict(self.profile.tokens)}
        return _target(self.store, "token_dataset", variant, config, {"tokenizer": tok.key, **tok.inputs})

    def codes(self, variant: str) -> dict[str, int]:
        """Code lengths and codebook sizes of a variant's token dataset (what the AR model is built for)."""
        model = self.profile.tokenizer_for(variant)
        return {
            "z_len": model.z_len,
            "num_visual": model.num_patches,
            "visual_codebook": model.visual_codebook,
            "prologue_codebook": model.prologue_codebook if model.z_len else 0,
        }

    # -- stage 3 and sampling ----------------------------------------------------------------------
    def ar(self, variant: str) -> Target:
        cfg = self.profile.ar_train_for(variant)
        model = model_config(cfg, self.codes(variant), len(self.listing.classes))
        if self.profile.variant(variant).ar_is_joint_prior:  # the stage-1 joint prior, not trained here
            config = {"variant": variant, "model": to_dict(model), "from": "joint_prior"}
            inputs = {"tokenizer": self.tokenizer(variant).key, "token_dataset": self.tokens(variant).key}
            return _target(self.store, "ar_model", variant, config, inputs)
        config = {"variant": variant, "model": to_dict(model), "train": key_dict(cfg)}
        return _target(self.store, "ar_model", variant, config, {"token_dataset": self.tokens(variant).key})

    @cached_property
    def sampling_seeds(self) -> list[int]:
        """Sampler seed of each sampling run: seed, seed + 1, ... (evaluation.sampling_runs)."""
        first = self.profile.sampler.seed
        return [first + i for i in range(self.profile.evaluation.sampling_runs)]

    def tuning(self, variant: str) -> Target:
        """The sampling settings searched for and selected for one variant."""
        config = {"tuning": key_dict(self.profile.tuning), "sampler": to_dict(self.profile.sampler)}
        inputs = {"ar_model": self.ar(variant).key, "tokenizer": self.tokenizer(variant).key,
                  "domain_classifier": self.domain().key}  # fmt: skip
        return _target(self.store, "sampling_tuning", variant, config, inputs)

    def samples(self, variant: str) -> list[Target]:
        """One sample set per sampling run, in seed order, with the tuned settings."""
        ev = self.profile.evaluation
        inputs = {"ar_model": self.ar(variant).key, "tokenizer": self.tokenizer(variant).key,
                  "sampling_tuning": self.tuning(variant).key}  # fmt: skip
        out = []
        for seed in self.sampling_seeds:
            config = {
                "variant": variant,
                "sampler": to_dict(replace(self.profile.sampler, seed=seed)),
                "samples_per_class": ev.samples_per_class,
                "shard_size": ev.sample_shard_size,
            }
            out.append(_target(self.store, "samples", variant, config, inputs))
        return out

    # -- evaluation --------------------------------------------------------------------------------
    @property
    def evaluators(self) -> dict[str, str]:
        """{evaluator: weights path}: the profile's (EfficientNet-Lite0) always, InceptionV3 when a
        local weights file is configured."""
        ev = self.profile.evaluation
        return {ev.evaluator: ""} | ({"inception": ev.inception_weights} if ev.inception_weights else {})

    def reference(self, evaluator: str) -> Target:
        from modeling.fidelity import sha256_file

        config: dict[str, Any] = {"evaluator": evaluator, "images": self.profile.evaluation.reference_images}
        if self.evaluators[evaluator]:
            config["weights_sha256"] = sha256_file(self.evaluators[evaluator])
        return _target(self.store, "reference_stats", evaluator, config, {"image_shards/val": self.shards("val").key})

    def references(self) -> dict[str, Target]:
        return {e: self.reference(e) for e in self.evaluators}

    def _reference_inputs(self) -> dict[str, str]:
        return {f"reference_stats/{e}": t.key for e, t in self.references().items()}

    @property
    def samples_per_set(self) -> int:
        """Samples per guidance setting in one sample set: samples_per_class x classes."""
        return self.profile.evaluation.samples_per_class * len(self.listing.classes)

    def domain(self) -> Target:
        """The domain classifier, its reference features (held-out train shards) and val features."""
        config = {
            "model": key_dict(self.profile.domain),
            "holdout_shards": self.profile.evaluation.domain_holdout_shards,
            "ceiling_images": self.samples_per_set,
        }
        inputs = {f"image_shards/{s}": self.shards(s).key for s in SPLITS}
        return _target(self.store, "domain_classifier", None, config, inputs)

    def reconstruction(self, variant: str) -> Target:
        inputs = {"tokenizer": self.tokenizer(variant).key, "domain_classifier": self.domain().key}
        inputs |= self._reference_inputs()
        return _target(self.store, "reconstruction_metrics", variant, {}, inputs)

    def generation(self, variant: str) -> Target:
        sets = self.samples(variant)
        inputs = {"samples": sets[0].key} | self._reference_inputs()
        inputs |= {f"samples/seed{s}": t.key for s, t in zip(self.sampling_seeds[1:], sets[1:], strict=True)}
        inputs |= {"domain_classifier": self.domain().key, "reconstruction_metrics": self.reconstruction(variant).key}
        config = {"feature_samples_per_class": self.profile.evaluation.feature_samples_per_class}
        return _target(self.store, "generation_metrics", variant, config, inputs)

    def probe_lengths(self, variant: str) -> list[int]:
        """How many first visual tokens the probe reads: a prologue variant its own z_len; the baseline
        every z_len of the profile's prologue variants (each compared at its own length)."""
        z = self.profile.tokenizer_for(variant).z_len
        if z:
            return [z]
        return sorted({self.profile.tokenizer_for(v).z_len for v in self.profile.variants} - {0}) or [
            self.profile.tokenizer.z_len
        ]

    def probe(self, variant: str) -> Target:
        config = {"steps": self.profile.evaluation.probe_steps, "first_visual": self.probe_lengths(variant)}
        return _target(self.store, "linear_probe", variant, config, {"token_dataset": self.tokens(variant).key})

    def mechanism(self, variant: str) -> Target:
        ev = self.profile.evaluation
        config = {"originals_per_class": ev.mechanism_originals, "resamples": ev.mechanism_resamples}
        inputs = {
            "ar_model": self.ar(variant).key,
            "tokenizer": self.tokenizer(variant).key,
            "token_dataset": self.tokens(variant).key,
            "samples": self.samples(variant)[0].key,
            "domain_classifier": self.domain().key,
        }
        return _target(self.store, "mechanism_metrics", variant, config, inputs)

    def results_inputs(self) -> dict[str, str]:
        """The table's lineage: the tokenizer and AR model of every variant."""
        out = {}
        for v in self.profile.variants:
            out[f"tokenizer/{v}"], out[f"ar_model/{v}"] = self.tokenizer(v).key, self.ar(v).key
        return out

    def results(self, rows: list[dict[str, Any]]) -> Target:
        """The results table holding `rows`: the numbers are its config (a changed metric is a new table)."""
        return _target(self.store, "results_table", None, {"rows": rows}, self.results_inputs())

    # -- the graph ----------------------------------------------------------------------------------
    def partitions(self, asset: str) -> list[str | None]:
        """The partitions of an asset: splits, evaluators, variants, or the one unpartitioned None."""
        if asset == "image_shards":
            return list(SPLITS)
        if asset == "reference_stats":
            return list(self.evaluators)
        if asset in ("results_table", "domain_classifier"):
            return [None]
        return list(self.profile.variants)

    def targets(self, asset: str, partition: str | None) -> list[Target]:
        """The target(s) of one asset partition (samples: one per sampling run; results_table: none
        known before its inputs exist)."""
        one = {
            "image_shards": self.shards,
            "tokenizer": self.tokenizer,
            "token_dataset": self.tokens,
            "ar_model": self.ar,
            "sampling_tuning": self.tuning,
            "reference_stats": self.reference,
            "domain_classifier": lambda _: self.domain(),
            "reconstruction_metrics": self.reconstruction,
            "generation_metrics": self.generation,
            "linear_probe": self.probe,
            "mechanism_metrics": self.mechanism,
        }
        if asset == "samples":
            return self.samples(partition)
        if asset == "results_table":
            return []
        return [one[asset](partition)]

    def deps(self, asset: str, partition: str | None) -> list[tuple[str, str | None]]:
        """The asset partitions one asset partition reads directly."""
        refs = [("reference_stats", e) for e in self.evaluators]
        if asset == "image_shards":
            return []
        if asset == "tokenizer":
            base_variant = self.profile.variant(partition).base_variant
            base = [("tokenizer", base_variant)] if base_variant is not None else []
            return [("image_shards", s) for s in SPLITS] + base
        if asset == "reference_stats":
            return [("image_shards", "val")]
        if asset == "domain_classifier":
            return [("image_shards", s) for s in SPLITS]
        if asset == "results_table":
            per_variant = ("tokenizer", "ar_model", "reconstruction_metrics", "generation_metrics", "linear_probe",
                           "mechanism_metrics")  # fmt: skip
            return [(a, v) for v in self.profile.variants for a in per_variant]
        upstream = {
            "token_dataset": [("tokenizer", partition)],
            "ar_model": [("token_dataset", partition)]
            + ([("tokenizer", partition)] if self.profile.variant(partition).ar_is_joint_prior else []),
            "sampling_tuning": [("ar_model", partition), ("tokenizer", partition), ("domain_classifier", None)],
            "samples": [("ar_model", partition), ("tokenizer", partition), ("sampling_tuning", partition)],
            "reconstruction_metrics": [("tokenizer", partition), ("domain_classifier", None), *refs],
            "generation_metrics": [("samples", partition), ("reconstruction_metrics", partition),
                                   ("domain_classifier", None), *refs],
            "linear_probe": [("token_dataset", partition)],
            "mechanism_metrics": [("ar_model", partition), ("tokenizer", partition), ("token_dataset", partition),
                                  ("samples", partition), ("domain_classifier", None)],
        }
        return upstream[asset]

    def order_of(self, nodes: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
        """Every asset partition the `nodes` need, upstream first, each once."""
        seen: list[tuple[str, str | None]] = []
        for node in nodes:
            seen += [n for n in self.order(*node) if n not in seen]
        return seen

    def order(self, asset: str, partition: str | None) -> list[tuple[str, str | None]]:
        """Every asset partition `asset[partition]` needs, upstream first, itself last."""
        seen: list[tuple[str, str | None]] = []

        def visit(node: tuple[str, str | None]) -> None:
            for dep in self.deps(*node):
                visit(dep)
            if node not in seen:
                seen.append(node)

        visit((asset, partition))
        return seen
