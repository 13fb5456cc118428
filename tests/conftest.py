"""Shared fixtures: a real S3-compatible server (moto) on 127.0.0.1, one store per backend, and the one
trained tiny store that the integration tests reuse."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from pipelines.launch import free_port
from pipelines.store import Store

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Credentials for the loopback server only; set before any boto/s3fs client is created.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)

# `make test` runs two pytest-xdist workers on the machine's cores: one torch thread each (inherited by
# the workers they launch), so that the two never oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server, speaking the S3 HTTP protocol on loopback."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # inherited by spawned workers and subprocesses
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="prologue-test")
    yield endpoint
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    """The same tests run against a local folder and against the S3 server."""
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return Store(f"s3://prologue-test/{uuid.uuid4().hex[:8]}", {"client_kwargs": {"endpoint_url": endpoint}})


@pytest.fixture(scope="session")
def fashion_mnist():
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        message = "Debian's dataset-fashion-mnist is not installed (make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return FASHION_MNIST


@pytest.fixture
def photo_folder(tmp_path) -> tuple[Path, int]:
    """A val class-folder tree of real photos (shipped by the foolbox wheel) plus one corrupt JPEG."""
    data = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    photos = sorted(p for p in data.iterdir() if p.name.startswith("imagenet_"))
    assert len(photos) >= 6
    root = tmp_path / "photos"
    for i, p in enumerate(photos):
        d = root / "val" / f"n0000000{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name)
    (root / "val" / "n00000001" / "broken.JPEG").write_bytes(photos[0].read_bytes()[:300])
    return root, len(photos)


# -- the one trained tiny store ------------------------------------------------------------------------
@dataclass
class TinyGraph:
    """The whole graph on the tiny profile, materialised once per test run."""

    root: Path
    """The store folder (read it; copy it with `copy_store` before writing)."""
    instance: object
    """The on-disk Dagster instance that holds the run and its event log (read it)."""
    run_id: str
    seconds: float
    listings: int
    """How many times the run opened (listed) a split of the raw source."""


def tiny_resources(root, overrides: list[str] | None = None) -> dict:
    from dagster import PipesSubprocessClient

    from assets.resources import ProfileResource, StoreResource

    return {
        "store": StoreResource(url=str(root)),
        "profile": ProfileResource(name="tiny", overrides=overrides or []),
        "pipes_subprocess_client": PipesSubprocessClient(),
    }


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `build` once per test run and shared by the xdist workers: the first
    worker to take the lock builds it, the others wait for it and read it. `_complete` is written last,
    so a build that failed is redone, in an emptied folder, by the next test that needs it."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above each worker's own
    folder = shared / name
    with FileLock(str(shared / f"{name}.lock")):
        if not (folder / "_complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / "_complete").touch()
    return folder


def _instance(folder: Path):
    """The on-disk Dagster instance in `folder` (SQLite: readable by every worker); the build creates
    it, telemetry off."""
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    if not (folder / "dagster.yaml").exists():
        folder.mkdir(exist_ok=True)
        (folder / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return DagsterInstance.from_ref(InstanceRef.from_dir(str(folder)))


def _build_tiny_graph(folder: Path) -> None:
    from assets.definitions import defs
    from pipelines import sources

    opened = []
    init = sources.Source.__init__

    def counting(self, *args, **kwargs):
        opened.append(type(self).__name__)
        init(self, *args, **kwargs)

    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources.Source, "__init__", counting)
        result = defs.resolve_job_def("retrain").execute_in_process(
            instance=_instance(folder / "dagster"), resources=tiny_resources(folder / "store")
        )
    assert result.success
    run = {"run_id": result.run_id, "seconds": time.perf_counter() - start, "listings": len(opened)}
    (folder / "run.json").write_text(json.dumps(run))


@pytest.fixture(scope="session")
def tiny_graph(tmp_path_factory, fashion_mnist) -> TinyGraph:
    """One run of the Dagster `retrain` job over an empty store: every asset, both tiny variants, built
    once per test run (by the first xdist worker to need it) and reused by every test. Read the store
    and the instance; copy the store before writing, and run new Dagster runs in an instance of your own."""
    folder = built_once(tmp_path_factory, "tiny_graph", _build_tiny_graph)
    run = json.loads((folder / "run.json").read_text())
    return TinyGraph(folder / "store", _instance(folder / "dagster"), run["run_id"], run["seconds"], run["listings"])


# Fixtures built once per test run. Their tests go last, bar one each that goes first: under xdist the
# workers build them at the start, while the rest of the suite runs beside.
BUILT_ONCE = ("tiny_graph", "trained_classifier")


def pytest_collection_modifyitems(items):
    first, rest, last = [], [], []
    for item in items:
        needs = [f for f in BUILT_ONCE if f in getattr(item, "fixturenames", ())]
        if needs and not any(needs[0] in getattr(i, "fixturenames", ()) for i in first):
            first.append(item)
        else:
            (last if needs else rest).append(item)
    items[:] = first + rest + last


def assert_same_ar_weights(resumed_store: Path, uninterrupted_store: Path, what: str) -> None:
    """The one AR model in `resumed_store` has, bit for bit, the final and EMA weights of the model with
    the same key (the same config) in `uninterrupted_store`."""
    import torch
    from safetensors.torch import load

    [b] = (resumed_store / "ar_model").iterdir()
    a = uninterrupted_store / "ar_model" / b.name
    for name in ("ar.safetensors", "ar_ema.safetensors"):
        wa, wb = load((a / "model" / name).read_bytes()), load((b / "model" / name).read_bytes())
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}:{k} differs after {what}"


def copy_store(src: Path, dest: Store, assets: tuple[str, ...] | None = None) -> Store:
    """Copy the artefacts of `assets` (default: all) from a local store folder into `dest` (local or S3)."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_file() and (assets is None or rel.parts[0] in assets):
            target = f"{dest.root}/{rel.as_posix()}"
            if dest.is_local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            dest.fs.put_file(str(path), target)
    return dest


UPSTREAM_OF_AR = ("image_shards", "tokenizer", "token_dataset")


def shard(profile, split: str, store: Store):
    """Shard one split of a profile's source (listed anew) into `store`."""
    from pipelines.plan import Plan
    from pipelines.sharding import shard_split

    return shard_split(Plan.from_listing(profile, store), split, progress=False)


@functools.cache
def _listing(data: str):
    """One listing per data config and test run: the raw sources do not change under the tests."""
    from modeling.config import from_dict
    from pipelines.plan import list_source
    from pipelines.profiles import DataConfig

    return list_source(from_dict(DataConfig, json.loads(data)))


def tiny_plan(store: Store, overrides: list[str] | None = None):
    """The tiny profile's plan over `store`."""
    from modeling.config import to_dict
    from pipelines.plan import Plan
    from pipelines.profiles import load_profile

    profile = load_profile("tiny", overrides or [])
    return Plan(profile, store, _listing(json.dumps(to_dict(profile.data), sort_keys=True)))


@pytest.fixture
def tiny_copy(tiny_graph, tmp_path) -> Store:
    """A private, writable copy of the trained tiny store."""
    shutil.copytree(tiny_graph.root, tmp_path / "tiny_copy")
    return Store(str(tmp_path / "tiny_copy"))
