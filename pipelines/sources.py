"""Image sources: one interface over the raw dataset layouts the pipeline ingests.

A Source lists its items once (deterministically, as plain picklable data) and decodes single
items on demand, so the index can be built in one process and the decoding fanned out to
spawn-started workers. Kinds:

* ``idx``         MNIST / Fashion-MNIST IDX files (gzip'd or plain) in a folder
* ``folder``      ``<url>/<split>/<class>/<image>`` trees (ImageNet style)
* ``ilsvrc_tar``  the ILSVRC2012 train tar (an outer tar of per-class tars), read in place
* ``kaggle_zip``  the Kaggle imagenet-object-localization-challenge zip, read in place

All file access goes through fsspec, so local paths, ``file://``, ``memory://`` and ``s3://`` URLs
work alike; archives are never extracted to disk.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass

import fsspec.core
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class CorruptImage(Exception):
    """An item's bytes could not be decoded into an image (message: ``"<key>: <reason>"``)."""


@dataclass(frozen=True, slots=True)  # slots: millions of these get pickled to workers
class Item:
    key: str  # unique within a source+split, only [A-Za-z0-9_-]: it becomes a WebDataset __key__
    label: int  # index into Source.classes
    ref: object  # picklable locator private to the source


def sanitise_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def decode_image(key: str, data: bytes) -> Image.Image:
    """Fully decode ``data``; grayscale stays "L", everything else becomes "RGB"."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # PIL decodes lazily; force it so truncation surfaces here, not in a worker later
        if img.mode == "1":
            return img.convert("L")
        return img if img.mode in ("L", "RGB") else img.convert("RGB")
    except _DECODE_ERRORS as e:
        raise CorruptImage(f"{key}: {type(e).__name__}: {e}") from e


def _is_image(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and posixpath.splitext(base)[1].lower() in IMAGE_EXTS


def _stem(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def _stamp(info: dict) -> list:
    """Cheap change marker of one file: size plus ETag (object stores) or mtime (local)."""
    return [info.get("size"), info.get("ETag") or info.get("mtime")]


def _sorted_unique(items: list[Item]) -> list[Item]:
    items = sorted(items, key=lambda it: it.key)
    for a, b in itertools.pairwise(items):
        if a.key == b.key:
            raise ValueError(f"duplicate item key {a.key!r} (from {a.ref!r} and {b.ref!r}); rename one file")
    return items


class Source:
    """Base class: plain data (url, split, classes, items, file stamps) plus per-process handles."""

    kind = ""

    def __init__(self, url: str, split: str, storage_options: dict | None = None):
        self.url, self.split = url, split
        self.storage_options = dict(storage_options or {})
        self.classes: list[str] = []
        self._items: list[Item] = []
        self._stamps: list = []  # what fingerprint() hashes besides the items
        self._proc_state: dict | None = None

    # -- per-process state: never pickled, rebuilt after fork/spawn ------------------------------
    def _proc(self) -> dict:
        # Keyed by pid because a forked child must not share the parent's file offset.
        if self._proc_state is None or self._proc_state["pid"] != os.getpid():
            self._proc_state = {"pid": os.getpid()}
        return self._proc_state

    def _fs(self):
        state = self._proc()
        if "fs" not in state:
            state["fs"], state["path"] = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return state["fs"], state["path"]

    def _handle(self):
        """Cached binary handle on the archive at ``url`` (tar/zip kinds)."""
        state = self._proc()
        if "fh" not in state:
            fs, path = self._fs()
            state["fh"] = fs.open(path, "rb")
        return state["fh"]

    def _archive_stamp(self) -> list:
        fs, path = self._fs()
        return [_stamp(fs.info(path))]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_proc_state"] = None
        return state

    def close(self):
        state, self._proc_state = self._proc_state or {}, None
        for name in ("zip", "fh"):  # the zip first: it reads through the raw handle
            if name in state:
                state[name].close()

    # -- public interface --------------------------------------------------------------------------
    def items(self) -> list[Item]:
        return list(self._items)

    def read(self, item: Item) -> Image.Image:  # fully decoded; CorruptImage for undecodable bytes
        raise NotImplementedError

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        head = {"kind": self.kind, "url": self.url, "split": self.split, "classes": self.classes}
        h.update(json.dumps(head, sort_keys=True).encode())
        for it in self._items:
            h.update(f"\n{it.key}\t{it.label}".encode())
        h.update(json.dumps(self._stamps, default=str).encode())
        return h.hexdigest()

    def __repr__(self):
        return f"{type(self).__name__}({self.url!r}, split={self.split!r}, items={len(self._items)})"


# -- idx ---------------------------------------------------------------------------------------------
_IDX_PREFIX = {"train": "train", "val": "t10k"}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_header(head: bytes, name: str, ndim: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """Validate an IDX header; returns (dtype, dims, header length)."""
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES:
        raise ValueError(f"{name}: bad IDX magic {head[:4].hex()!r}")
    if head[3] != ndim or len(head) < 4 + 4 * ndim:
        raise ValueError(f"{name}: expected a {ndim}-d IDX header, got {head[3]}-d / {len(head)} bytes")
    return np.dtype(_IDX_DTYPES[head[2]]), struct.unpack(f">{ndim}I", head[4:4 + 4 * ndim]), 4 + 4 * ndim


class IdxSource(Source):
    kind = "idx"

    def __init__(self, url, split, storage_options=None):
        super().__init__(url, split, storage_options)
        if split not in _IDX_PREFIX:
            raise ValueError(f"idx source: unknown split {split!r} (use 'train' or 'val')")
        fs, root = self._fs()
        self._images = self._find(fs, root, f"{_IDX_PREFIX[split]}-images-idx3-ubyte")
        self._labels = self._find(fs, root, f"{_IDX_PREFIX[split]}-labels-idx1-ubyte")
        labels = self._load(self._labels, ndim=1)
        # Loading the pixels now validates them up front; the array stays cached for this process only.
        if len(self._pixels()) != len(labels):
            raise ValueError(f"{self._images}: {len(self._pixels())} images but {len(labels)} labels")
        fashion = "fashion" in posixpath.basename(root.rstrip("/")).lower()
        self.classes = list(FASHION_CLASSES) if fashion else [str(d) for d in range(10)]
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(self.classes):
            raise ValueError(f"{self._labels}: labels outside 0..{len(self.classes) - 1}")
        self._items = [Item(f"{split}_{i:06d}", int(lab), i) for i, lab in enumerate(labels)]
        # content hashes, not mtimes: small files, and the same data gets the same cache keys everywhere
        self._stamps = [hashlib.sha256(fs.cat_file(p)).hexdigest() for p in (self._images, self._labels)]

    @staticmethod
    def _find(fs, root, name):
        for candidate in (f"{root}/{name}.gz", f"{root}/{name}"):
            if fs.exists(candidate):
                return candidate
        raise FileNotFoundError(f"no {name}(.gz) in {root}")

    def _load(self, path, ndim) -> np.ndarray:
        data = self._fs()[0].cat_file(path)
        if data[:2] == b"\x1f\x8b":  # sniff rather than trust the file name
            data = gzip.decompress(data)
        dtype, dims, start = _idx_header(data, path, ndim)
        if len(data) - start != int(np.prod(dims)) * dtype.itemsize:
            raise ValueError(f"{path}: header says {dims} but file has {len(data) - start} data bytes")
        return np.frombuffer(data, dtype, offset=start).reshape(dims)

    def _pixels(self) -> np.ndarray:
        state = self._proc()
        if "pixels" not in state:
            pixels = self._load(self._images, ndim=3)
            if pixels.dtype != np.uint8:
                raise ValueError(f"{self._images}: expected unsigned byte pixels, header says {pixels.dtype}")
            state["pixels"] = pixels
        return state["pixels"]

    def read(self, item):
        arr = self._pixels()[item.ref]
        # frombytes copies, so the image never aliases the shared read-only array
        return Image.frombytes("L", (arr.shape[1], arr.shape[0]), arr.tobytes())


# -- folder ------------------------------------------------------------------------------------------
class FolderSource(Source):
    kind = "folder"

    def __init__(self, url, split, storage_options=None):
        super().__init__(url, split, storage_options)
        fs, root = self._fs()
        root = root.rstrip("/")
        split_root = f"{root}/{split}"
        if not fs.isdir(split_root):
            raise FileNotFoundError(f"folder source: no {split!r} folder under {url}")
        # val must use train's class mapping, so classes come from train whenever it exists
        class_root = f"{root}/train" if fs.isdir(f"{root}/train") else split_root
        self.classes = sorted(posixpath.basename(i["name"].rstrip("/")) for i in fs.ls(class_root, detail=True)
                              if i["type"] == "directory" and not posixpath.basename(i["name"]).startswith("."))
        index = {c: i for i, c in enumerate(self.classes)}
        items, stamps = [], {}
        for path, info in fs.find(split_root, detail=True).items():
            parts = path[len(split_root):].strip("/").split("/")
            if len(parts) != 2 or not _is_image(path):
                continue
            if parts[0] not in index:
                raise ValueError(f"folder source: class {parts[0]!r} in {split!r} is not among {class_root}")
            items.append(Item(sanitise_key(f"{parts[0]}_{_stem(path)}"), index[parts[0]], path))
            stamps[path] = _stamp(info)
        self._items = _sorted_unique(items)
        self._stamps = [stamps[it.ref] for it in self._items]

    def read(self, item):
        return decode_image(item.key, self._fs()[0].cat_file(item.ref))


# -- ilsvrc_tar --------------------------------------------------------------------------------------
class _Window:
    """Read-only view of bytes [start, start+size) of a seekable file: bounds an inner tar to its
    outer member so a damaged inner tar cannot read on into the next one. TarFile records offsets as
    ``fileobj.tell()`` values (absolute, not relative to the position it was opened at), so offsets
    seen through the window are window-relative and the caller adds ``start``."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def read(self, n=-1):
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if n <= 0:
            return b""
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos, whence=0):
        self.pos = (pos, self.pos + pos, self.size + pos)[whence]
        return self.pos

    def tell(self):
        return self.pos


def _tar_members(fileobj) -> list[tarfile.TarInfo]:
    """Regular-file members with a complete header; a truncated tail ends the listing quietly."""
    members = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:  # closing leaves fileobj open
            for m in tar:  # a loop, not a comprehension: keep what was listed before an error
                if m.isfile():
                    members.append(m)
    except tarfile.ReadError:
        if not members:
            raise
    return members


class IlsvrcTarSource(Source):
    kind = "ilsvrc_tar"

    def __init__(self, url, split, storage_options=None):
        super().__init__(url, split, storage_options)
        if split != "train":
            raise ValueError("ilsvrc_tar supports only split 'train': the ILSVRC val tar has no class "
                             "folders; use kind 'folder' (after sorting val into classes) or 'kaggle_zip'")
        f = self._handle()
        inner_tars = [m for m in _tar_members(f) if m.name.endswith(".tar")]
        self.classes = sorted(_stem(m.name) for m in inner_tars)
        index = {c: i for i, c in enumerate(self.classes)}
        items = []
        for outer in inner_tars:
            try:
                inner = _tar_members(_Window(f, outer.offset_data, outer.size))
            except tarfile.ReadError:  # inner tar cut off before its first header: nothing to index
                continue
            items += [Item(sanitise_key(_stem(m.name)), index[_stem(outer.name)],
                           (outer.offset_data + m.offset_data, m.size)) for m in inner if _is_image(m.name)]
        self._items = _sorted_unique(items)
        self._stamps = self._archive_stamp()

    def read(self, item):
        offset, size = item.ref
        f = self._handle()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise CorruptImage(f"{item.key}: truncated archive member: got {len(data)} of {size} bytes")
        return decode_image(item.key, data)


# -- kaggle_zip --------------------------------------------------------------------------------------
class KaggleZipSource(Source):
    kind = "kaggle_zip"
    TRAIN = "ILSVRC/Data/CLS-LOC/train/"
    VAL = "ILSVRC/Data/CLS-LOC/val/"
    VAL_LABELS = "LOC_val_solution.csv"

    def __init__(self, url, split, storage_options=None):
        super().__init__(url, split, storage_options)
        if split not in ("train", "val"):
            raise ValueError(f"kaggle_zip: unsupported split {split!r} (use 'train' or 'val'; test is unlabelled)")
        names = self._zip().namelist()
        train = [(n, n[len(self.TRAIN):].split("/")) for n in names if n.startswith(self.TRAIN)]
        self.classes = sorted({parts[0] for _, parts in train if len(parts) >= 2 and parts[0]})
        index = {c: i for i, c in enumerate(self.classes)}
        if split == "train":
            items = [Item(sanitise_key(_stem(n)), index[parts[0]], n)
                     for n, parts in train if len(parts) == 2 and _is_image(n)]
        else:
            wnids = self._val_labels()
            val = [n for n in names if n.startswith(self.VAL) and "/" not in n[len(self.VAL):] and _is_image(n)]
            unknown = [n for n in val if wnids.get(_stem(n)) not in index]
            if unknown:
                raise ValueError(f"kaggle_zip: {len(unknown)} val images have no train-class label in "
                                 f"{self.VAL_LABELS}, e.g. {unknown[0]}")
            items = [Item(sanitise_key(_stem(n)), index[wnids[_stem(n)]], n) for n in val]
        self._items = _sorted_unique(items)
        self._stamps = self._archive_stamp()

    def _zip(self) -> zipfile.ZipFile:
        state = self._proc()
        if "zip" not in state:
            state["zip"] = zipfile.ZipFile(self._handle())
        return state["zip"]

    def _val_labels(self) -> dict[str, str]:
        try:
            raw = self._zip().read(self.VAL_LABELS)
        except KeyError:
            raise ValueError(f"kaggle_zip: {self.VAL_LABELS} missing from {self.url}") from None
        rows = csv.DictReader(io.StringIO(raw.decode("utf-8-sig")))
        return {r["ImageId"]: r["PredictionString"].split()[0] for r in rows if r["PredictionString"].strip()}

    def read(self, item):
        try:
            data = self._zip().read(item.ref)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # CRC mismatch, bad deflate stream, cut off
            raise CorruptImage(f"{item.key}: {type(e).__name__}: {e}") from e
        return decode_image(item.key, data)


SOURCES = {cls.kind: cls for cls in (IdxSource, FolderSource, IlsvrcTarSource, KaggleZipSource)}


def open_source(kind: str, url: str, split: str, storage_options: dict | None = None) -> Source:
    """Index the dataset of layout ``kind`` at ``url`` for ``split`` ('train' or 'val')."""
    if kind not in SOURCES:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {sorted(SOURCES)}")
    return SOURCES[kind](url, split, storage_options)
