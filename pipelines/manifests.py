"""Typed manifests: what each asset's `_manifest.json` holds, parsed once into a dataclass.

The JSON on disk is unchanged (stored artefacts keep their manifests and keys); `parse()` checks
that a manifest has exactly the fields of its asset's class, so a step reading an input gets
attributes (`tokens.codes.z_len`, `ar.counts.parameters`) instead of string lookups, and a
manifest of the wrong shape fails where it is read, naming the field. Free-form figures from
trainers and evaluators (`metrics`) stay mappings.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The fields every manifest has."""

    asset: str
    cache_key: str
    uri: str
    created_at: str
    files: dict[str, FileEntry]
    config: dict[str, Any]
    lineage: dict[str, Any]
    code_version: str
    # wall and CPU seconds (this process and its workers) of the attempt that committed it, and the
    # machine it ran on (`store.machine()`; absent before 2026-12-06); absent in manifests written
    # before timing was recorded. A resumed step counts only its last attempt.
    timing: dict[str, Any] | None = dataclasses.field(default=None, kw_only=True)


@dataclass(frozen=True)
class ShardCounts:
    samples: int
    corrupt: int
    shards: int
    source_items: int
    per_class: dict[str, int]


@dataclass(frozen=True)
class ShardsManifest(Manifest):
    profile: str
    shards: list[str]
    counts: ShardCounts
    corrupt_keys: list[str]
    classes: list[str]


@dataclass(frozen=True)
class TrainingCounts:
    steps: int
    parameters: int = 0


@dataclass(frozen=True)
class TokenizerManifest(Manifest):
    profile: str
    counts: TrainingCounts
    metrics: dict[str, Any]
    checkpoints: list[str]


@dataclass(frozen=True)
class Codes:
    z_len: int
    num_visual: int
    visual_codebook: int
    prologue_codebook: int


@dataclass(frozen=True)
class TokensManifest(Manifest):
    profile: str
    counts: dict[str, Any]
    layout: dict[str, dict[str, list[dict[str, Any]]]]
    views: list[str]
    codes: Codes
    classes: list[str]
    sanity: dict[str, Any]


@dataclass(frozen=True)
class ARManifest(Manifest):
    profile: str
    counts: TrainingCounts
    metrics: dict[str, Any]
    checkpoints: list[str]
    deepspeed: dict[str, Any]


@dataclass(frozen=True)
class SamplesManifest(Manifest):
    profile: str
    layout: dict[str, list[str]]
    classes: list[str]
    counts: dict[str, Any]
    image: dict[str, Any]
    seed_rule: str
    samplers: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class ReferenceCounts:
    images: int


@dataclass(frozen=True)
class ReferenceManifest(Manifest):
    counts: ReferenceCounts
    stats_sha256: str


@dataclass(frozen=True)
class MetricsManifest(Manifest):
    profile: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class ResultsManifest(Manifest):
    profile: str
    rows: list[dict[str, Any]]
    over_training_seeds: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Per group of variants that differ only by training seed: each figure's mean and std over them."""
    seed_group_gaps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Each arm with several training seeds against the baseline's (results.seed_group_gaps)."""
    one_setting_gaps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Each row with a setting suffix against its arm, and a prologue arm against the same-setting baseline
    (results.one_setting_gaps)."""
    step_times: dict[str, Any] | None = None
    """Wall and CPU seconds per variant and step, of the shared steps, and in all (results.step_times)."""


MANIFESTS: dict[str, type[Manifest]] = {
    "image_shards": ShardsManifest,
    "tokenizer": TokenizerManifest,
    "token_dataset": TokensManifest,
    "ar_model": ARManifest,
    "samples": SamplesManifest,
    "reference_stats": ReferenceManifest,
    "reconstruction_metrics": MetricsManifest,
    "generation_metrics": MetricsManifest,
    "linear_probe": MetricsManifest,
    "domain_classifier": MetricsManifest,
    "mechanism_metrics": MetricsManifest,
    "sampling_tuning": MetricsManifest,
    "results_table": ResultsManifest,
}


def read(artifact: Any, what: str) -> Any:
    """The typed manifest of a materialised artefact (a `pipelines.store.Artifact`); a clear error
    naming `what` when it has none."""
    raw = artifact.manifest()
    if raw is None:
        raise FileNotFoundError(f"{artifact.uri}: {what} not materialised (no manifest)")
    return parse(raw)


def parse(raw: dict[str, Any]) -> Manifest:
    """The typed manifest of a raw `_manifest.json` (its `asset` field picks the class)."""
    return _build(MANIFESTS[raw["asset"]], raw, raw["asset"])


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where} manifest: unknown field {unknown[0]!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = _build(tp, value, f"{where}.{name}")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            item = typing.get_args(tp)[1]
            value = {k: _build(item, v, f"{where}.{name}[{k}]") for k, v in value.items()}
        values[name] = value
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{where} manifest: {e}") from None
