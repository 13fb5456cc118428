"""Stream image shards back from the store (local or S3) into a torch DataLoader.

Built from WebDataset stages: shard list -> split across ranks -> split across DataLoader
workers -> open through fsspec with the store's credentials (WebDataset has no s3:// opener) ->
tar expansion -> samples. Each shard's size is checked against the manifest before it is read,
so a truncated shard fails loudly instead of silently yielding fewer samples.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipelines.manifests import Manifest, read
from pipelines.store import Artifact, Store


class TruncatedShard(IOError):
    """A shard in the store is not the size its manifest records."""


def rank_and_world() -> tuple[int, int]:
    """This process's data-parallel rank: torch.distributed if initialised, else RANK/WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _split_by_rank(src: Iterator[dict], rank: int, world_size: int) -> Iterator[dict]:
    for i, sample in enumerate(src):
        if i % world_size == rank:
            yield sample


def _open_shards(src: Iterator[dict], store: Store, sizes: Mapping[str, int]) -> Iterator[dict]:
    for sample in src:
        url = sample["url"]
        stream = store.open_url(url)
        expected = sizes.get(url)
        actual = stream.size if hasattr(stream, "size") else os.fstat(stream.fileno()).st_size
        if expected is not None and actual != expected:
            stream.close()
            raise TruncatedShard(f"{url}: {actual} bytes, the manifest records {expected}")
        sample.update(stream=stream)
        yield sample


def _samples(src: Iterator[dict]) -> Iterator[dict]:
    return group_by_keys(tar_file_expander(src))


def _image_and_label(sample: dict) -> tuple[torch.Tensor, int]:
    return sample["png"], sample["cls"]


def image_dataset(
    artifact: Artifact,
    manifest: Manifest | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle: int = 0,
    seed: int = 0,
    decode: bool = True,
    shards: list[str] | None = None,
) -> wds.DataPipeline:
    """Samples of one `image_shards` artefact (its typed manifest, read if not given).

    decode=True yields (uint8 tensor [3, H, W], label); decode=False yields the raw sample dicts
    (`__key__`, `png` bytes, `cls` bytes, `json` bytes). `shuffle` > 0 shuffles the shard order
    (seeded) and keeps a sample buffer of that size. Every rank must use the same seed. `shards`
    restricts reading to those tar files (paths as in the manifest's `files`: also the sample
    shards of a `samples` artefact).
    """
    manifest = manifest or read(artifact, "image_shards")
    rels = manifest.shards if shards is None else shards
    return read_tars(artifact, {rel: manifest.files[rel].size for rel in rels}, rank=rank, world_size=world_size,
                     shuffle=shuffle, seed=seed, decode=decode)  # fmt: skip


def read_tars(
    artifact: Artifact,
    sizes: Mapping[str, int],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle: int = 0,
    seed: int = 0,
    decode: bool = True,
) -> wds.DataPipeline:
    """The samples of these tar files of `artifact` ({path: size it must have}), in this order;
    the arguments as in `image_dataset`."""
    if rank is None or world_size is None:
        rank, world_size = rank_and_world()
    urls = [artifact.file_uri(rel) for rel in sizes]
    expected = {artifact.file_uri(rel): size for rel, size in sizes.items()}
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        urls = [urls[i] for i in torch.randperm(len(urls), generator=g).tolist()]
    stages: list[Any] = [
        wds.SimpleShardList(urls),
        wds.pipelinefilter(_split_by_rank)(rank, world_size),
        wds.split_by_worker,
        wds.pipelinefilter(_open_shards)(artifact.store, expected),
        _samples,
    ]
    if shuffle:
        stages.append(wds.shuffle(shuffle, initial=min(shuffle, 100), rng=_rng(seed, rank)))
    if decode:
        stages += [wds.decode("torchrgb8"), wds.map(_image_and_label)]
    return wds.DataPipeline(*stages)


def _rng(seed: int, rank: int) -> random.Random:
    return random.Random(seed * 1000003 + rank)


def image_loader(
    artifact: Artifact,
    batch_size: int,
    *,
    num_workers: int = 2,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle: int = 0,
    seed: int = 0,
    shards: list[str] | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader of (images uint8 [B, 3, H, W], labels [B]) batches from the store (`shards`: only
    those shard files)."""
    ds = image_dataset(artifact, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, shards=shards)
    ds.append(wds.batched(batch_size, partial=True))
    # its own generator: creating an iterator must not draw from the global RNG, or resuming
    # training mid-epoch would shift every later random draw (dropout, masks) of the trainer
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(seed))


def sample_set_images(artifact: Artifact, manifest, guidance: str, per_class: int = 0) -> Iterator[tuple]:
    """(image uint8 [3, H, W], label) of one guidance setting of a `samples` artefact (its typed
    manifest); per_class > 0 keeps the first per_class of each class (shards hold each class's
    samples in index order)."""
    seen: dict[int, int] = {}
    for image, label in image_dataset(artifact, manifest, rank=0, world_size=1, shards=manifest.layout[guidance]):
        seen[label] = seen.get(label, 0) + 1
        if not per_class or seen[label] <= per_class:
            yield image, label


def labelled_batches(items: Iterable[tuple[torch.Tensor, int]], n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image, label) pairs -> (images [B, 3, H, W], labels [B]) batches of up to n."""
    chunk: list[tuple[torch.Tensor, int]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield torch.stack([im for im, _ in chunk]), torch.tensor([int(y) for _, y in chunk])
            chunk = []
    if chunk:
        yield torch.stack([im for im, _ in chunk]), torch.tensor([int(y) for _, y in chunk])
