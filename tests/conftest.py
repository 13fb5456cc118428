"""Shared fixtures: a real S3-compatible server (moto) on 127.0.0.1 and one store per backend."""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from pathlib import Path

import pytest

from pipelines.launch import free_port
from pipelines.store import Store

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Credentials for the loopback server only; set before any boto/s3fs client is created.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


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
