"""Tests for pipelines.sources against small real fixtures built in tmp_path.

The photos are the real ImageNet JPEGs that the foolbox package ships as sample data; the archives
are built with tarfile/zipfile in the same layouts as the ILSVRC2012 train tar and the Kaggle zip.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import re
import struct
import tarfile
import uuid
import zipfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipelines.sources import FASHION_CLASSES, CorruptImage, decode_image, open_source

FOOLBOX_DATA = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
WNIDS = ["n00000001", "n00000002", "n00000003"]
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# -- fixture builders ------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def expected_image(data: bytes) -> Image.Image:
    """Reference decode, independent of the code under test: grayscale stays L, all else RGB."""
    img = Image.open(io.BytesIO(data))
    return img.convert("L" if img.mode in ("L", "1") else "RGB")


def assert_same_image(got: Image.Image, data: bytes):
    want = expected_image(data)
    assert got.mode == want.mode and got.size == want.size
    assert np.array_equal(np.asarray(got), np.asarray(want))


def bad_jpeg(data: bytes) -> bytes:
    return data[:200]  # a real JPEG cut inside its headers


@pytest.fixture(scope="module")
def records() -> list[tuple[str, str, str, bytes]]:
    """(split, wnid, file name, bytes): 9 train + 3 val photos over 3 fake classes, plus mode variants."""
    photos = sorted(FOOLBOX_DATA.glob("imagenet_*.jpg"))[:12]
    assert len(photos) == 12, f"foolbox sample photos missing under {FOOLBOX_DATA}"
    recs = []
    for i, path in enumerate(photos):
        wnid = WNIDS[i % 3]
        if i < 9:
            recs.append(("train", wnid, f"{wnid}_{i}.JPEG", path.read_bytes()))
        else:
            recs.append(("val", wnid, f"ILSVRC2012_val_{i:08d}.JPEG", path.read_bytes()))
    first = Image.open(photos[0])
    recs.append(("train", WNIDS[0], f"{WNIDS[0]}_gray.jpeg", encode(first.convert("L"), "JPEG")))
    recs.append(("train", WNIDS[1], f"{WNIDS[1]}_pal.png", encode(first.convert("P"), "PNG")))
    return recs


def stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def write_folder(recs, dest: Path):
    expected = defaultdict(dict)
    for split, wnid, name, data in recs:
        (dest / split / wnid).mkdir(parents=True, exist_ok=True)
        (dest / split / wnid / name).write_bytes(data)
        expected[split][f"{wnid}_{stem(name)}"] = (wnid, data)
    (dest / "train" / WNIDS[0] / "README.txt").write_text("not an image")  # must be ignored
    return str(dest), dict(expected)


def tar_add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_ilsvrc_tar(recs, dest: Path):
    by_class, expected = defaultdict(list), {}
    for split, wnid, name, data in recs:
        if split == "train":
            by_class[wnid].append((name, data))
            expected[stem(name)] = (wnid, data)
    path = dest.with_suffix(".tar")
    with tarfile.open(path, "w") as outer:
        for wnid in reversed(WNIDS):  # not sorted in the archive: classes must still come out sorted
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for name, data in by_class[wnid]:
                    tar_add(t, name, data)
            tar_add(outer, f"{wnid}.tar", inner.getvalue())
    return str(path), {"train": expected}


def write_kaggle_zip(recs, dest: Path):
    expected, rows = defaultdict(dict), []
    path = dest.with_suffix(".zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for split, wnid, name, data in recs:
            if split == "train":
                z.writestr(f"ILSVRC/Data/CLS-LOC/train/{wnid}/{name}", data)
            else:
                z.writestr(f"ILSVRC/Data/CLS-LOC/val/{name}", data)
                rows.append(f"{stem(name)},{wnid} 10 20 300 400 {wnid} 1 2 3 4")
            expected[split][stem(name)] = (wnid, data)
        z.writestr("LOC_val_solution.csv", "ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return str(path), dict(expected)


BUILDERS = {"folder": write_folder, "ilsvrc_tar": write_ilsvrc_tar, "kaggle_zip": write_kaggle_zip}


@pytest.fixture(params=sorted(BUILDERS))
def dataset(request, tmp_path, records):
    """(kind, url, {split: {key: (wnid, original bytes)}}) for each archive layout."""
    url, expected = BUILDERS[request.param](records, tmp_path / "ds")
    return request.param, url, expected


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")
    root = f"/sources-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


# -- behaviour common to the archive kinds -----------------------------------------------------------
def test_index_labels_and_order(dataset):
    kind, url, expected = dataset
    for split, want in expected.items():
        src = open_source(kind, url, split)
        items = src.items()
        assert src.classes == WNIDS
        assert [it.key for it in items] == sorted(want)
        assert all(KEY_RE.match(it.key) for it in items)
        assert all(src.classes[it.label] == want[it.key][0] for it in items)
        assert open_source(kind, url, split).items() == items  # stable across opens


def test_read_matches_pil_decode(dataset):
    kind, url, expected = dataset
    for split, want in expected.items():
        src = open_source(kind, url, split)
        for it in src.items():
            assert_same_image(src.read(it), want[it.key][1])


def test_modes_of_variants(dataset):
    kind, url, _ = dataset
    src = open_source(kind, url, "train")
    modes = {it.key: src.read(it).mode for it in src.items()}
    assert [k for k, m in modes.items() if m == "L"] == [k for k in modes if k.endswith("_gray")]
    assert all(m == "RGB" for k, m in modes.items() if not k.endswith("_gray"))


def test_corrupt_image_raises_naming_key(tmp_path, records):
    wnid = WNIDS[2]
    bad = [("train", wnid, f"{wnid}_trunc.JPEG", bad_jpeg(records[0][3])),
           ("train", wnid, f"{wnid}_noise.JPEG", np.random.default_rng(0).bytes(5000))]
    for kind, build in BUILDERS.items():
        url, _ = build(records + bad, tmp_path / kind)
        src = open_source(kind, url, "train")
        broken = [it for it in src.items() if it.key.endswith(("_trunc", "_noise"))]
        assert len(broken) == 2, kind
        for it in broken:
            with pytest.raises(CorruptImage, match=re.escape(it.key)):
                src.read(it)
        for it in src.items():  # one bad file must not poison the handle for the rest
            if it not in broken:
                src.read(it)


def test_fingerprint_stable_and_sensitive(tmp_path, records):
    extra = ("train", WNIDS[0], f"{WNIDS[0]}_extra.JPEG", records[1][3])
    for kind, build in BUILDERS.items():
        url, _ = build(records, tmp_path / kind)
        fp = open_source(kind, url, "train").fingerprint()
        assert re.fullmatch(r"[0-9a-f]{64}", fp)
        assert open_source(kind, url, "train").fingerprint() == fp
        url2, _ = build([*records, extra], tmp_path / kind)
        assert url2 == url and open_source(kind, url, "train").fingerprint() != fp, kind


def test_folder_fingerprint_changes_when_file_added(tmp_path, records):
    url, _ = write_folder(records, tmp_path / "ds")
    fp = open_source("folder", url, "train").fingerprint()
    assert open_source("folder", url, "val").fingerprint() != fp
    (tmp_path / "ds" / "train" / WNIDS[1] / "new.png").write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    assert open_source("folder", url, "train").fingerprint() != fp


def test_pickle_round_trip_after_reading(dataset):
    kind, url, expected = dataset
    src = open_source(kind, url, "train")
    first = src.items()[0]
    src.read(first)  # opens the per-process handles that must not travel
    clone = pickle.loads(pickle.dumps(src))
    assert clone.items() == src.items() and clone.classes == src.classes
    assert clone.fingerprint() == src.fingerprint()
    for it in clone.items():
        assert_same_image(clone.read(it), expected["train"][it.key][1])
    src.close()
    assert_same_image(src.read(first), expected["train"][first.key][1])  # reopens after close()


def _decode_all(src) -> list[tuple[str, str, bytes]]:
    return [(it.key, img.mode, img.tobytes()) for it in src.items() for img in [src.read(it)]]


def test_read_in_spawned_worker(tmp_path, records):
    sources = [open_source(kind, build(records, tmp_path / kind)[0], "train") for kind, build in BUILDERS.items()]
    for src in sources:
        src.read(src.items()[0])
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        remote = list(pool.map(_decode_all, sources))
    assert remote == [_decode_all(src) for src in sources]


def test_memory_url(dataset, memfs):
    kind, url, expected = dataset
    fs, root = memfs
    local = Path(url)
    if local.is_dir():
        for f in local.rglob("*"):
            if f.is_file():
                fs.pipe(f"{root}/{f.relative_to(local).as_posix()}", f.read_bytes())
        mem_url = f"memory://{root}"
    else:
        mem_url = f"memory://{root}/{local.name}"
        fs.pipe(mem_url, local.read_bytes())
    for split, want in expected.items():
        src = open_source(kind, mem_url, split)
        assert [it.key for it in src.items()] == sorted(want)
        for it in src.items():
            assert_same_image(src.read(it), want[it.key][1])
        assert_same_image(pickle.loads(pickle.dumps(src)).read(it), want[it.key][1])


# -- folder specifics --------------------------------------------------------------------------------
def test_folder_key_collision_is_an_error(tmp_path, records):
    url, _ = write_folder(records, tmp_path / "ds")
    for name in ("a.b.JPEG", "a_b.JPEG"):  # both sanitise to <wnid>_a_b
        (tmp_path / "ds" / "train" / WNIDS[0] / name).write_bytes(records[0][3])
    with pytest.raises(ValueError, match="duplicate item key"):
        open_source("folder", url, "train")


def test_folder_val_class_must_exist_in_train(tmp_path, records):
    url, _ = write_folder(records, tmp_path / "ds")
    (tmp_path / "ds" / "val" / "n09999999").mkdir()
    (tmp_path / "ds" / "val" / "n09999999" / "x.JPEG").write_bytes(records[0][3])
    with pytest.raises(ValueError, match="n09999999"):
        open_source("folder", url, "val")


# -- ilsvrc_tar specifics ----------------------------------------------------------------------------
def test_ilsvrc_refs_are_absolute_offsets(tmp_path, records):
    url, expected = write_ilsvrc_tar(records, tmp_path / "ds")
    raw = Path(url).read_bytes()
    for it in open_source("ilsvrc_tar", url, "train").items():
        offset, size = it.ref
        assert raw[offset:offset + size] == expected["train"][it.key][1]


def test_ilsvrc_val_split_is_rejected(tmp_path, records):
    url, _ = write_ilsvrc_tar(records, tmp_path / "ds")
    with pytest.raises(ValueError, match="kaggle_zip"):
        open_source("ilsvrc_tar", url, "val")


def test_ilsvrc_truncated_tar(tmp_path, records):
    url, expected = write_ilsvrc_tar(records, tmp_path / "ds")
    full = open_source("ilsvrc_tar", url, "train").items()
    last = max(full, key=lambda it: it.ref[0])
    raw = Path(url).read_bytes()

    cut = tmp_path / "cut_data.tar"  # the last image's header survives, half its bytes do not
    cut.write_bytes(raw[:last.ref[0] + last.ref[1] // 2])
    src = open_source("ilsvrc_tar", str(cut), "train")
    assert src.items() == full and src.classes == WNIDS
    with pytest.raises(CorruptImage, match=f"{last.key}: truncated archive member: got"):
        src.read(last)
    for it in src.items():
        if it != last:
            assert_same_image(src.read(it), expected["train"][it.key][1])

    cut = tmp_path / "cut_header.tar"  # cut inside the last image's header: it is simply not indexed
    cut.write_bytes(raw[:last.ref[0] - 300])
    assert open_source("ilsvrc_tar", str(cut), "train").items() == [it for it in full if it != last]


# -- kaggle_zip specifics ----------------------------------------------------------------------------
def test_kaggle_val_labels_come_from_csv(tmp_path, records):
    url, _ = write_kaggle_zip(records, tmp_path / "ds")
    val = open_source("kaggle_zip", url, "val")
    want = {stem(name): wnid for split, wnid, name, _ in records if split == "val"}
    assert {it.key: val.classes[it.label] for it in val.items()} == want
    assert all(it.ref.startswith("ILSVRC/Data/CLS-LOC/val/") for it in val.items())
    with pytest.raises(ValueError, match="split"):
        open_source("kaggle_zip", url, "test")


def test_kaggle_missing_solution_csv(tmp_path, records):
    path = tmp_path / "nocsv.zip"
    with zipfile.ZipFile(path, "w") as z:
        for split, wnid, name, data in records:
            folder = f"train/{wnid}" if split == "train" else "val"
            z.writestr(f"ILSVRC/Data/CLS-LOC/{folder}/{name}", data)
    assert len(open_source("kaggle_zip", str(path), "train").items()) == 11
    with pytest.raises(ValueError, match=r"LOC_val_solution\.csv"):
        open_source("kaggle_zip", str(path), "val")


# -- idx ---------------------------------------------------------------------------------------------
def idx_bytes(arr: np.ndarray, magic: bytes = b"\0\0\x08") -> bytes:
    return magic + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool, **overrides):
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {"images-idx3-ubyte": idx_bytes(images), "labels-idx1-ubyte": idx_bytes(labels)} | overrides
    for name, blob in blobs.items():
        path = folder / f"{prefix}-{name}{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(blob) if gz else blob)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_synthetic(tmp_path, gz):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    write_idx(tmp_path / "digits", "t10k", images, labels, gz)
    src = open_source("idx", str(tmp_path / "digits"), "val")
    assert src.classes == [str(d) for d in range(10)]
    assert [it.key for it in src.items()] == [f"val_{i:06d}" for i in range(7)]
    assert [it.label for it in src.items()] == labels.tolist()
    src = pickle.loads(pickle.dumps(src))
    for it in src.items():
        img = src.read(it)
        assert img.mode == "L" and img.size == (28, 28)
        assert np.array_equal(np.asarray(img), images[it.ref])


def test_idx_rejects_bad_files(tmp_path):
    images, labels = np.zeros((3, 28, 28)), np.zeros(3)
    write_idx(tmp_path / "magic", "train", images, labels, True,
              **{"images-idx3-ubyte": idx_bytes(images, magic=b"\x08\x03\0")})
    with pytest.raises(ValueError, match="bad IDX magic"):
        open_source("idx", str(tmp_path / "magic"), "train")
    write_idx(tmp_path / "short", "train", images, labels, False,
              **{"images-idx3-ubyte": idx_bytes(images)[:-5]})
    with pytest.raises(ValueError, match="header says"):
        open_source("idx", str(tmp_path / "short"), "train")
    write_idx(tmp_path / "count", "train", images, np.zeros(4), False)
    with pytest.raises(ValueError, match="3 images but 4 labels"):
        open_source("idx", str(tmp_path / "count"), "train")
    with pytest.raises(FileNotFoundError):
        open_source("idx", str(tmp_path / "count"), "val")


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason=f"{FASHION_MNIST} missing (apt install dataset-fashion-mnist)")
def test_idx_real_fashion_mnist():
    for split, count in (("train", 60000), ("val", 10000)):
        src = open_source("idx", str(FASHION_MNIST), split)
        items = src.items()
        assert len(items) == count and src.classes == FASHION_CLASSES
        labels = np.array([it.label for it in items])
        assert labels.min() == 0 and labels.max() == 9 and len(np.unique(labels)) == 10
        for it in (items[0], items[-1]):
            img = src.read(it)
            assert img.mode == "L" and img.size == (28, 28) and np.asarray(img).any()
        assert src.fingerprint() == open_source("idx", str(FASHION_MNIST), split).fingerprint()


# -- decoding and dispatch ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode,fmt,want", [("CMYK", "JPEG", "RGB"), ("RGBA", "PNG", "RGB"), ("LA", "PNG", "RGB"),
                                           ("P", "PNG", "RGB"), ("1", "PNG", "L"), ("L", "PNG", "L"),
                                           ("RGB", "WEBP", "RGB"), ("RGB", "BMP", "RGB")])
def test_decode_modes(mode, fmt, want):
    img = decode_image("k", encode(Image.new(mode, (5, 3)), fmt))
    assert img.mode == want and img.size == (5, 3)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown source kind"):
        open_source("lmdb", "/nowhere", "train")


@pytest.mark.s3
def test_s3_url(s3_endpoint, tmp_path, records):
    """The same code reads s3:// URLs (moto server from conftest); stamps then carry ETags."""
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    fs = fsspec.filesystem("s3", **options)
    prefix = f"prologue-test/sources-{uuid.uuid4().hex}"
    for kind, build in BUILDERS.items():
        local, expected = build(records, tmp_path / kind)
        fs.put(local, f"{prefix}/{kind}/{Path(local).name}", recursive=True)
        src = open_source(kind, f"s3://{prefix}/{kind}/{Path(local).name}", "train", options)
        assert [it.key for it in src.items()] == sorted(expected["train"])
        src = pickle.loads(pickle.dumps(src))
        for it in src.items()[:3]:
            assert_same_image(src.read(it), expected["train"][it.key][1])
        assert all(etag for _, etag in src._stamps), src._stamps
