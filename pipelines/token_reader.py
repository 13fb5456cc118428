"""Stream a pre-tokenised dataset (`token_dataset`) from the store into training, in batches.

Units are what a reader fetches at once: a Parquet row group, or a whole WebDataset tar (read with
WebDataset's tar expander). Per epoch the units are permuted with the seed, dealt round-robin to the
ranks and then to the DataLoader workers of each rank; each worker concatenates consecutive units
into windows of about `shuffle_rows` rows, permutes the rows of a window and cuts batches. Memory
holds one window per worker, never the dataset.

The order is a pure function of (seed, epoch, rank, world size, workers), so a reader resumes
exactly: `start_batch=k` yields what batch k onwards of an uninterrupted reader would have been.
The DataLoader takes batches from its workers in turn (logical worker b % W makes batch b), so a
resumed loader's worker i plays logical worker (i + k) % W and skips that worker's share of the
first k batches: whole windows by the row counts in the manifest, unread.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipelines.manifests import TokensManifest, read
from pipelines.shard_reader import TruncatedShard, rank_and_world
from pipelines.store import Artifact

FORMATS = ("parquet", "wds")


@dataclass(frozen=True)
class Unit:
    rel: str  # file inside the artefact
    index: int  # Parquet row group; -1 for a whole WebDataset tar
    rows: int


def units(manifest: TokensManifest, split: str, fmt: str) -> list[Unit]:
    """Every readable unit of one split in one format, in storage order."""
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    out = []
    for f in manifest.layout[fmt][split]:
        if fmt == "parquet":
            out += [Unit(f["file"], i, n) for i, n in enumerate(f["units"])]
        else:
            out.append(Unit(f["file"], -1, f["rows"]))
    return out


class UnitReader:
    """Reads units into (labels int16 [R], codes uint16 [R, Z + N]), checking file sizes first."""

    def __init__(self, artifact: Artifact, manifest: TokensManifest):
        self.artifact, self.manifest = artifact, manifest
        self.z_len = manifest.codes.z_len
        self._open: tuple[str, pq.ParquetFile] | None = None  # the Parquet file being read

    def _stream(self, rel: str):
        stream = self.artifact.store.open_url(self.artifact.file_uri(rel))
        expected = self.manifest.files[rel].size
        actual = stream.size if hasattr(stream, "size") else self.artifact.fs.size(self.artifact.file_path(rel))
        if actual != expected:
            stream.close()
            raise TruncatedShard(f"{self.artifact.file_uri(rel)}: {actual} bytes, the manifest records {expected}")
        return stream

    def read(self, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        if unit.index < 0:
            return self._read_tar(unit)
        if self._open is None or self._open[0] != unit.rel:
            self._open = (unit.rel, pq.ParquetFile(self._stream(unit.rel)))
        table = self._open[1].read_row_group(unit.index, columns=["label", "prologue", "visual"])
        n = table.num_rows
        prologue = table.column("prologue").combine_chunks().flatten().to_numpy().reshape(n, self.z_len)
        visual = table.column("visual").combine_chunks().flatten().to_numpy().reshape(n, -1)
        return table.column("label").to_numpy(), np.concatenate([prologue, visual], axis=1)

    def _read_tar(self, unit: Unit) -> tuple[np.ndarray, np.ndarray]:
        with self._stream(unit.rel) as stream:
            blocks = list(group_by_keys(tar_file_expander([{"url": unit.rel, "stream": stream}])))
        labels = np.concatenate([np.load(io.BytesIO(b["cls.npy"])) for b in blocks])
        codes = np.concatenate([np.load(io.BytesIO(b["codes.npy"])) for b in blocks])
        if len(labels) != unit.rows:
            raise TruncatedShard(f"{unit.rel}: {len(labels)} rows, the manifest records {unit.rows}")
        return labels, codes


class TokenStream(torch.utils.data.IterableDataset):
    """Batches (labels [B], prologue [B, Z], visual [B, N]) as int64 tensors; see the module doc."""

    def __init__(
        self,
        artifact: Artifact,
        batch_size: int,
        *,
        split: str = "train",
        fmt: str = "parquet",
        shuffle: bool = True,
        shuffle_rows: int = 16384,
        seed: int = 0,
        epochs: int | None = None,
        start_batch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        self.manifest = read(artifact, "token_dataset")
        if rank is None or world_size is None:
            rank, world_size = rank_and_world()
        self.artifact, self.batch_size, self.fmt, self.split = artifact, batch_size, fmt, split
        self.shuffle, self.shuffle_rows, self.seed, self.epochs = shuffle, shuffle_rows, seed, epochs
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.units = units(self.manifest, split, fmt)
        self.z_len = self.manifest.codes.z_len

    def _windows(self, epoch: int, worker: int, workers: int) -> list[list[Unit]]:
        """This worker's units of one epoch, grouped into shuffle windows."""
        order = list(range(len(self.units)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        mine = [self.units[i] for i in order[self.rank :: self.world_size][worker::workers]]
        windows: list[list[Unit]] = [[]]
        for u in mine:
            if sum(x.rows for x in windows[-1]) >= self.shuffle_rows:
                windows.append([])
            windows[-1].append(u)
        return [w for w in windows if w]

    def _rows(self, worker: int, workers: int, skip: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(labels, codes) chunks of this worker's row stream, the first `skip` rows left out."""
        reader = UnitReader(self.artifact, self.manifest)
        for epoch in range(self.epochs) if self.epochs is not None else itertools.count():
            for i, window in enumerate(self._windows(epoch, worker, workers)):
                rows = sum(u.rows for u in window)
                if skip >= rows:  # skipped without reading
                    skip -= rows
                    continue
                labels, codes = zip(*(reader.read(u) for u in window), strict=True)
                labels, codes = np.concatenate(labels), np.concatenate(codes)
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, worker, i])
                    perm = rng.permutation(rows)
                    labels, codes = labels[perm], codes[perm]
                yield labels[skip:], codes[skip:]
                skip = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        # The DataLoader asks loader worker 0 first; after k batches, the next is logical worker k % W's.
        worker = ((info.id if info is not None else 0) + self.start_batch) % workers
        if len(self.units) < self.world_size * workers:
            raise ValueError(
                f"{self.artifact.uri}: {len(self.units)} {self.fmt} units in {self.split} for {self.world_size} "
                f"rank(s) x {workers} loader worker(s); use fewer workers or a smaller tokens.rows_per_group"
            )
        # batches this worker made among the first start_batch ones of its rank (round-robin)
        skipped = max(0, (self.start_batch - worker + workers - 1) // workers)
        pending_labels: list[np.ndarray] = []
        pending_codes: list[np.ndarray] = []
        have = 0
        for labels, codes in self._rows(worker, workers, skipped * self.batch_size):
            pending_labels.append(labels)
            pending_codes.append(codes)
            have += len(labels)
            if have < self.batch_size:
                continue
            labels, codes = np.concatenate(pending_labels), np.concatenate(pending_codes)
            cut = have - have % self.batch_size
            for i in range(0, cut, self.batch_size):
                yield self._batch(labels[i : i + self.batch_size], codes[i : i + self.batch_size])
            pending_labels, pending_codes, have = [labels[cut:]], [codes[cut:]], have - cut
        if have:  # only reached with a finite number of epochs
            yield self._batch(np.concatenate(pending_labels), np.concatenate(pending_codes))

    def _batch(self, labels: np.ndarray, codes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = torch.from_numpy(codes.astype(np.int64))
        return torch.from_numpy(labels.astype(np.int64)), codes[:, : self.z_len], codes[:, self.z_len :]


def token_loader(
    artifact: Artifact, batch_size: int, *, num_workers: int = 1, **stream_args
) -> torch.utils.data.DataLoader:
    """A DataLoader over a TokenStream (keyword arguments as TokenStream's)."""
    stream = TokenStream(artifact, batch_size, **stream_args)
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, generator=torch.Generator().manual_seed(stream.seed)
    )


def split_rows(artifact: Artifact, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels [N], prologue [N, Z], visual [N, L]) int64 of one split of a `token_dataset`, original
    views only (aug 0), in storage order (read whole: for evaluation, not training)."""

    def column(t, name: str) -> torch.Tensor:
        flat = t.column(name).combine_chunks().flatten().to_numpy().astype(np.int64)
        return torch.from_numpy(flat).view(t.num_rows, -1)

    parts = []
    for f in read(artifact, "token_dataset").layout["parquet"][split]:
        with artifact.store.open_url(artifact.file_uri(f["file"])) as stream:
            t = pq.read_table(stream, columns=["label", "aug", "prologue", "visual"], filters=[("aug", "=", 0)])
        parts.append((torch.from_numpy(t.column("label").to_numpy().astype(np.int64)), column(t, "prologue"),
                      column(t, "visual")))  # fmt: skip
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))
