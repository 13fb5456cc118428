"""Worker of the `samples` step: one sampling rank (every processes-th shard task).

Each task (guidance, class, chunk) becomes one WebDataset tar of lossless PNGs, recorded as a part,
so a killed run continues without duplicates. Once every rank is done, rank 0 reports the run's
counts (`sampling.tally` over the parts, what the parent commits) and sampler settings through Dagster
Pipes when launched by it. Started as `python -m pipelines.workers.sampling`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import webdataset as wds

from modeling.config import from_dict
from modeling.sampler import SamplerConfig
from pipelines.images import encode_png, to_pil
from pipelines.launch import worker_context
from pipelines.loaders import load_ar, load_tokenizer
from pipelines.sampling import ASSET, tally, tasks, to_uint8
from pipelines.store import Artifact, Store
from pipelines.workers import join_ranks, report, say, worker_main


def run(store: Store, key: str, progress: bool) -> None:
    from modeling.sampler import sample, sample_seeds

    ctx = worker_context()
    rank, world, device = ctx.rank, ctx.world, ctx.device
    artifact = store.artifact(ASSET, key)
    spec = artifact.read_json("spec.json")
    samplers = {g: from_dict(SamplerConfig, c) for g, c in spec["samplers"].items()}  # the tuned settings
    model = load_ar(store.artifact("ar_model", spec["inputs"]["ar_model"]), device)
    tokenizer = load_tokenizer(store.artifact("tokenizer", spec["inputs"]["tokenizer"]), device)
    done, todo = artifact.parts(), tasks(spec["num_classes"], spec["samples_per_class"], spec["shard_size"])
    mine = [t for t in todo[rank::world] if t[0] not in done]
    bar = ctx.progress(sum(t[4] - t[3] for t in mine), unit="img", enabled=progress)
    for name, g, c, first, end in mine:
        t0, cfg = time.perf_counter(), samplers[g]
        rel, seeds = f"samples/{name}.tar", []
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "shard.tar")
            with wds.TarWriter(local, mtime=0.0) as sink:  # fixed mtime: same samples -> same bytes
                for i in range(first, end, cfg.batch_size):
                    idx = torch.arange(i, min(end, i + cfg.batch_size))
                    cls = torch.full_like(idx, c)
                    batch_seeds = sample_seeds(cfg.seed, cls, idx)
                    codes = sample(model, cls.to(device), batch_seeds, cfg)
                    with torch.no_grad():
                        images = to_pil(to_uint8(tokenizer.decode_codes(codes["visual"])))
                    for j, img in enumerate(images):
                        meta = {
                            "class": c,
                            "index": int(idx[j]),
                            "seed": int(batch_seeds[j]),
                            "guidance": g,
                            "prologue": codes["prologue"][j].tolist(),
                        }
                        sink.write(
                            {
                                "__key__": f"{g}_{c:04d}_{int(idx[j]):06d}",
                                "png": encode_png(img),
                                "cls": c,
                                "json": meta,
                            }
                        )
                        seeds.append(meta["seed"])
                    bar.update(len(idx))
            record = artifact.put_file(local, rel)
        artifact.record_part(name, {"files": {rel: record.__dict__}, "samples": len(seeds), "seeds": seeds})
        ctx.say(f"{name}: {len(seeds)} samples ({len(seeds) / (time.perf_counter() - t0):.1f} img/s)")
    bar.close()
    join_ranks(world)
    if rank == 0:
        _report(artifact, spec, todo)


def _report(artifact: Artifact, spec: dict, todo: list[tuple]) -> None:
    """Rank 0, every rank done: the run's counts and sampler settings, as the parent will commit them."""
    parts = artifact.parts()
    if all(t[0] in parts for t in todo):  # else the parent names what is missing
        _, _, counts = tally(parts, todo, spec["classes"])
        say(f"{counts['samples']['cfg']} samples with guidance, {counts['samples']['nocfg']} without")
        report(artifact, {"counts": counts, "samplers": spec["samplers"]})


if __name__ == "__main__":
    sys.exit(worker_main(run))
