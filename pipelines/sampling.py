"""Mass sampling: N images per class from a trained AR model, with and without guidance, as PNG shards.

`generate_samples()` (what the `samples` asset calls) takes the plan's AR model and tokenizer and,
for each sampling run (sampler seed), launches its worker (`pipelines.workers.sampling`) on `evaluation.processes`
ranks; each rank takes every N-th shard task. A task is (guidance, class, chunk):
`evaluation.sample_shard_size` consecutive sample indices
of one class, sampled with the KV-cache sampler (`modeling.sampler`), decoded by the tokenizer and
written as a WebDataset tar `samples/<guidance>-c<class>-<chunk>.tar` of lossless PNGs:

    <guidance>_<class>_<index>.png   the image (uint8 RGB, the tokenizer's resolution)
    <guidance>_<class>_<index>.cls   the class index
    <guidance>_<class>_<index>.json  class, index, seed, guidance, prologue codes

Sample i of class c has seed `sample_seed(sampler.seed, c, i)`, recorded in its json, so any sample
can be regenerated alone. Finished tasks are recorded as parts: a killed run continues where it
stopped, without duplicates. Guidance `cfg` and `nocfg` use the settings `sampling_tuning[variant]`
selected (split guidance, and guidance off), with this run's seed. Once every rank is done, rank 0
reports the run's counts and sampler settings (through Dagster Pipes when launched by it). The
parent then draws the per-class grids (and, for the prologue variant, a "fixed prologue, resampled
visual tokens" grid) and commits the manifest.

Standalone: `python -m pipelines.sampling --profile fashion32 --variant prologue`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from dataclasses import replace

import torch

from modeling.config import from_dict, to_dict
from modeling.sampler import SamplerConfig
from pipelines.images import grid_png
from pipelines.launch import Runner, launch_worker
from pipelines.loaders import load_ar, load_tokenizer
from pipelines.manifests import SamplesManifest
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.profiles import Profile
from pipelines.runner import step_main
from pipelines.store import Artifact, StepResult

ASSET = "samples"
GUIDANCE = ("cfg", "nocfg")
log = logging.getLogger(__name__)


def tasks(num_classes: int, per_class: int, shard_size: int) -> list[tuple[str, str, int, int, int]]:
    """(shard name, guidance, class, first index, end index) of every shard."""
    out = []
    for g in GUIDANCE:
        for c in range(num_classes):
            for k, start in enumerate(range(0, per_class, shard_size)):
                out.append((f"{g}-c{c:04d}-{k:03d}", g, c, start, min(per_class, start + shard_size)))
    return out


def generate_samples(
    plan: Plan,
    variant: str,
    *,
    on_log: Callable[[str], None] = log.info,
    progress: bool = True,
    runner: Runner | None = None,
) -> list[StepResult]:
    """Sample (or find) every sampling run's sample set of one variant (one per sampler seed)."""
    return [
        cached_or_run(t, lambda t=t: _sample(plan, t, variant, progress, on_log, runner), on_log)
        for t in plan.samples(variant)
    ]


def _sample(plan: Plan, target: Target, variant: str, progress: bool, on_log, runner: Runner | None) -> dict:
    ar, tok = plan.ar(variant), plan.tokenizer(variant)
    ar.require()
    tok_manifest = tok.require()
    selected = plan.tuning(variant).require().metrics["selected"]
    classes = plan.tokens(variant).require().classes
    ev, artifact = plan.profile.evaluation, target.artifact
    seed = target.config["sampler"]["seed"]  # this run's seed; the other settings are the tuned ones
    samplers = {g: to_dict(replace(from_dict(SamplerConfig, selected[g]), seed=seed)) for g in GUIDANCE}
    spec = {**target.config, "inputs": target.inputs, "num_classes": len(classes), "classes": classes,
            "samplers": samplers}  # fmt: skip
    spec_record = artifact.put_json("spec.json", spec)
    launch_worker("sampling", plan.store, artifact.key, ev.processes, progress, on_log, runner=runner)
    parts = artifact.parts()
    todo = tasks(len(classes), ev.samples_per_class, ev.sample_shard_size)
    missing = [t[0] for t in todo if t[0] not in parts]
    if missing:
        raise RuntimeError(f"{artifact.uri}: the sampling subprocess exited without {', '.join(missing[:5])} ...")
    shard_files, layout, counts = tally(parts, todo, classes)
    files = {"spec.json": spec_record.__dict__, **shard_files}
    nocfg = from_dict(SamplerConfig, samplers["nocfg"])
    for rel, png in _grids(artifact, layout, ar.artifact, tok.artifact, classes, nocfg).items():
        files[rel] = artifact.put_bytes(rel, png).__dict__
    return artifact.commit(
        files,
        profile=plan.label,
        config=target.config,
        lineage=target.inputs,
        code_version=CODE_VERSIONS[ASSET],
        layout=layout,
        classes=classes,
        counts=counts,
        image={"size": tok_manifest.config["model"]["image_size"], "format": "png"},
        seed_rule="blake2b-8(f'{sampler.seed}/{class}/{index}') >> 1 (modeling.sampler.sample_seed)",
        samplers=samplers,
    )


def tally(parts: dict[str, dict], todo: list[tuple], classes: list[str]) -> tuple[dict, dict, dict]:
    """(files, layout, counts) of a sampling run whose every task has its part: what the parent commits
    and what the worker reports (samples per class and guidance, totals, unique seeds)."""
    files: dict[str, dict] = {}
    layout: dict[str, list[str]] = {g: [] for g in GUIDANCE}
    per_class: dict[str, dict[str, int]] = {g: {c: 0 for c in classes} for g in GUIDANCE}
    seeds: dict[str, set[int]] = {g: set() for g in GUIDANCE}  # cfg and nocfg share seeds: paired sets
    for name, g, c, _, _ in todo:
        part = parts[name]
        files.update(part["files"])
        layout[g] += list(part["files"])
        per_class[g][classes[c]] += part["samples"]
        seeds[g].update(part["seeds"])
    counts = {
        "per_class": per_class,
        "samples": {g: sum(c.values()) for g, c in per_class.items()},
        "unique_seeds": {g: len(v) for g, v in seeds.items()},
    }
    return files, layout, counts


PREVIEW_CLASSES = 16  # grid rows: the first 16 classes (1,000 ImageNet rows would be a ~250,000 px tall PNG)


def preview_shards(layout: list[str]) -> list[str]:
    """The first shard of each of the first PREVIEW_CLASSES classes (`.../<g>-c<class>-000.tar`)."""
    return [rel for rel in layout if (m := re.search(r"-c(\d+)-000\.tar$", rel)) and int(m[1]) < PREVIEW_CLASSES]


def _grids(artifact, layout, ar_art, tok_art, classes, cfg) -> dict[str, bytes]:
    """Sample grids (8 per class, up to PREVIEW_CLASSES classes, per guidance) and, with prologue
    tokens, rows that keep a sample's prologue and redraw its visual tokens."""
    from pipelines.shard_reader import read_tars

    out = {}
    for g in GUIDANCE:
        first = {}  # class -> up to 8 images, read back from the shards just written
        shards = preview_shards(layout[g])
        sizes = {rel: artifact.fs.size(artifact.file_path(rel)) for rel in shards}
        for img, label in read_tars(artifact, sizes, rank=0, world_size=1):
            if len(first.setdefault(int(label), [])) < 8:
                first[int(label)].append(img)
        out[f"grid_{g}.png"] = grid_png(torch.stack([im for c in sorted(first) for im in first[c]]), columns=8)
    model = load_ar(ar_art)
    if model.Z:
        from modeling.sampler import resample_visual, sample, sample_seeds

        tokenizer = load_tokenizer(tok_art)
        rows = []
        for c in range(min(len(classes), 6)):
            cls = torch.full((1,), c)
            original = sample(model, cls, sample_seeds(cfg.seed, cls, torch.zeros(1, dtype=torch.long)), cfg)
            k = torch.arange(1, 8)
            again = resample_visual(
                model,
                cls.repeat(7),
                original["prologue"].repeat(7, 1),
                sample_seeds(cfg.seed + 1, cls.repeat(7), k),
                cfg,
            )
            rows.append(torch.cat([original["visual"], again["visual"]]))
        with torch.no_grad():
            images = to_uint8(tokenizer.decode_codes(torch.cat(rows)))
        out["resample_visual.png"] = grid_png(images, columns=8)
    return out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def main(argv: list[str] | None = None) -> int:
    return step_main(__doc__, argv, ASSET, summary=lambda m: f"{m.counts['samples']} samples")


if __name__ == "__main__":
    sys.exit(main())


def protocol_problems(artifact: Artifact, manifest: SamplesManifest, profile: Profile) -> list[str]:
    """What differs from the profile's sampling protocol (empty: the sample set is as specified):
    sample count and per-class balance per guidance, unique seeds, image size and format."""
    import io

    from PIL import Image

    problems = []
    per_class = profile.evaluation.samples_per_class
    for g in GUIDANCE:
        for name, n in manifest.counts["per_class"][g].items():
            if n != per_class:
                problems.append(f"{g}: class {name!r} has {n} samples, the protocol says {per_class}")
        unique, total = manifest.counts["unique_seeds"][g], manifest.counts["samples"][g]
        if unique != total:
            problems.append(f"{g}: {unique} unique seeds for {total} samples")
    img = Image.open(io.BytesIO(_first_png(artifact, manifest.layout["cfg"][0])))
    side = profile.data.resolution
    if img.format != "PNG" or img.size != (side, side):
        problems.append(f"samples are {img.format} {img.size[0]}x{img.size[1]}, the protocol says PNG {side}x{side}")
    return problems


def _first_png(artifact: Artifact, rel: str) -> bytes:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with artifact.store.open_url(artifact.file_uri(rel)) as stream:
        return next(group_by_keys(tar_file_expander([{"url": rel, "stream": stream}])))["png"]
