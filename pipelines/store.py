"""Object store: content-addressed artefact directories, committed by writing a manifest last.

Layout: `<store>/<asset>/<cache_key>/...`, where the cache key hashes the asset's code version,
its config and the cache keys of its inputs. A directory counts as materialised only when its
`_manifest.json` exists; the manifest is written last and atomically (a single PUT on S3, a
rename on a local disk), so a crash never leaves a directory that looks complete. Long steps
record finished parts under `_parts/` (each written after its data file), so a rerun resumes.

The store URL comes from one setting: the `url` argument, else `PROLOGUE_STORE`, else the
`store/` folder of the project. S3 endpoints and credentials come from the standard AWS
environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or explicit storage options.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import resource
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs

MANIFEST = "_manifest.json"
PARTS = "_parts"
DEFAULT_STORE = Path(__file__).resolve().parents[1] / "store"


def cache_key(asset: str, code_version: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """sha256 over (asset, code version, config, input keys); the first 24 hex digits."""
    payload = json.dumps(
        {"asset": asset, "code_version": code_version, "config": config, "inputs": dict(inputs)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def default_storage_options(url: str) -> dict[str, Any]:
    """S3 options from the environment; listing caches off so other processes' writes are seen.

    Transient errors (connection refused or reset, timeouts, 5xx, throttling) are retried by
    botocore's standard mode: exponential backoff with jitter (about 1, 2, 4, ... s, at most 20 s
    apart) for PROLOGUE_S3_ATTEMPTS attempts in all (default 10: an outage of about a minute is
    ridden out), on top of s3fs's own short retries of interrupted reads.
    """
    if not url.startswith(("s3://", "s3a://")):
        return {}
    attempts = int(os.environ.get("PROLOGUE_S3_ATTEMPTS", "10"))
    opts: dict[str, Any] = {
        "use_listings_cache": False,
        "config_kwargs": {"retries": {"mode": "standard", "max_attempts": attempts}, "connect_timeout": 10},
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished subprocesses (the workers, once waited for)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def machine() -> dict[str, Any]:
    """What wrote an artefact, for reading numbers across machines (results are bit-identical on one
    machine, not across CPU models): the CPU model, its logical cores and, when this process has
    imported torch, torch's version, its CPU threads and the CUDA device it uses."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass  # not Linux: platform's name
    out: dict[str, Any] = {"cpu": cpu, "logical_cores": os.cpu_count()}
    torch = sys.modules.get("torch")  # not imported here: a step without torch records no torch fields
    if torch is not None:
        out |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_device"] = torch.cuda.get_device_name()
    return out


def machine_label(m: Mapping[str, Any]) -> str:
    """One line for a `machine()` record: 'AMD EPYC, 2 cores, torch 2.13.0 (2 threads)'."""
    label = f"{m['cpu']}, {m['logical_cores']} cores"
    if "torch" in m:
        label += f", torch {m['torch']} ({m['torch_threads']} threads)"
    return label + (f", {m['cuda_device']}" if "cuda_device" in m else "")


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str


class Store:
    """One object store root. Picklable: worker processes rebuild the filesystem from url+options."""

    def __init__(self, url: str | None = None, storage_options: Mapping[str, Any] | None = None):
        url = url or os.environ.get("PROLOGUE_STORE") or str(DEFAULT_STORE)
        self.url = url.rstrip("/")
        self.storage_options = {**default_storage_options(self.url), **(storage_options or {})}
        self.fs, self.root = url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")
        if self.is_local:
            self.fs.makedirs(self.root, exist_ok=True)

    def __getstate__(self):
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.__init__(state["url"], state["storage_options"])

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def uri(self, path: str) -> str:
        """A URL for a path inside this store that fsspec (and a person) can open."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def artifact(self, asset: str, key: str) -> Artifact:
        return Artifact(self, asset, key)

    def open_url(self, url: str, mode: str = "rb"):
        """Open a URL of this store (as returned by `uri`) with the store's credentials."""
        return fsspec.open(url, mode, **self.storage_options).open()


class Artifact:
    """The directory of one materialisation of one asset."""

    def __init__(self, store: Store, asset: str, key: str):
        self.store, self.asset, self.key = store, asset, key
        self.path = f"{store.root}/{asset}/{key}"
        self._began: tuple[float, float] | None = None  # (wall, CPU) clocks when the step began writing

    def begin(self) -> None:
        """Start the clocks whose readings `commit` records as the manifest's `timing`."""
        self._began = (time.perf_counter(), cpu_seconds())

    @property
    def fs(self):
        return self.store.fs

    @property
    def uri(self) -> str:
        return self.store.uri(self.path)

    def file_path(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    def file_uri(self, rel: str) -> str:
        return self.store.uri(self.file_path(rel))

    # -- reading ---------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """The committed manifest, or None while the artefact is absent or incomplete."""
        try:
            return json.loads(self.fs.cat_file(self.file_path(MANIFEST)))
        except FileNotFoundError:
            return None

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.file_path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def verify(self, manifest: Mapping[str, Any] | None = None, checksums: bool = False) -> list[str]:
        """Problems found comparing stored files with the manifest (empty list: all good)."""
        manifest = manifest or self.manifest()
        if manifest is None:
            return [f"{self.uri}: no {MANIFEST} (not materialised or interrupted)"]
        problems = []
        for rel, rec in manifest["files"].items():
            p = self.file_path(rel)
            try:
                size = self.fs.size(p)
            except FileNotFoundError:
                problems.append(f"{rel}: missing")
                continue
            if size != rec["size"]:
                problems.append(f"{rel}: {size} bytes, manifest says {rec['size']} (truncated?)")
            elif checksums and hashlib.sha256(self.fs.cat_file(p)).hexdigest() != rec["sha256"]:
                problems.append(f"{rel}: sha256 differs from the manifest")
        return problems

    # -- writing ---------------------------------------------------------------------------
    def put_file(self, local_path: str | os.PathLike, rel: str) -> FileRecord:
        record = FileRecord(os.path.getsize(local_path), file_sha256(local_path))
        self.fs.makedirs(os.path.dirname(self.file_path(rel)), exist_ok=True)
        self.fs.put_file(str(local_path), self.file_path(rel))
        return record

    def put_bytes(self, rel: str, data: bytes) -> FileRecord:
        self._write_atomic(rel, data)
        return FileRecord(len(data), hashlib.sha256(data).hexdigest())

    def put_json(self, rel: str, obj: Any) -> FileRecord:
        """A JSON file (a step's spec, its metrics) written atomically."""
        return self.put_bytes(rel, json.dumps(obj, indent=1).encode())

    def put_safetensors(self, rel: str, state_dict: Mapping[str, Any]) -> FileRecord:
        """Weights as float32-or-native contiguous CPU tensors in one safetensors file."""
        from safetensors.torch import save

        return self.put_bytes(rel, save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}))

    def _write_atomic(self, rel: str, data: bytes) -> None:
        target = self.file_path(rel)
        self.fs.makedirs(os.path.dirname(target), exist_ok=True)
        if self.store.is_local:  # write beside, then rename: readers never see a partial file
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:  # one PUT is atomic on S3
            self.fs.pipe_file(target, data)

    # -- resumable parts -------------------------------------------------------------------
    def record_part(self, name: str, record: Mapping[str, Any]) -> None:
        """Mark one finished piece of a long job (call after its data file is fully written)."""
        self._write_atomic(f"{PARTS}/{name}.json", json.dumps(record, sort_keys=True).encode())

    def parts(self) -> dict[str, dict[str, Any]]:
        """Finished parts of an interrupted run whose files still have their recorded sizes."""
        try:
            paths = self.fs.ls(self.file_path(PARTS), detail=False)
        except FileNotFoundError:
            return {}
        done = {}
        for p in sorted(paths):
            if not p.endswith(".json"):
                continue
            record = json.loads(self.fs.cat_file(p))
            ok = all(
                self.fs.exists(self.file_path(rel)) and self.fs.size(self.file_path(rel)) == f["size"]
                for rel, f in record.get("files", {}).items()
            )
            if ok:
                done[os.path.basename(p)[: -len(".json")]] = record
        return done

    def commit_trained(
        self,
        files: Mapping[str, FileRecord | Mapping[str, Any]],
        *,
        counts: tuple[str, ...] = ("steps",),
        recorded: tuple[str, ...] = ("metrics", "checkpoints"),
        **fields: Any,
    ) -> dict[str, Any]:
        """Commit what a training subprocess recorded in its `final` part (its files, the `recorded`
        fields and the `counts`) together with `files`; fails if it exited without that part."""
        final = self.parts().get("final")
        if final is None:
            raise RuntimeError(f"{self.uri}: the training subprocess exited without its final outputs")
        return self.commit(
            {**final["files"], **files},
            counts={k: final[k] for k in counts},
            **{k: final[k] for k in recorded},
            **fields,
        )

    def commit(self, files: Mapping[str, FileRecord | Mapping[str, Any]], **fields: Any) -> dict[str, Any]:
        """Write the manifest (last, atomically): this is what makes the artefact exist."""
        manifest = {
            "asset": self.asset,
            "cache_key": self.key,
            "uri": self.uri,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "files": {
                rel: (rec.__dict__ if isinstance(rec, FileRecord) else dict(rec)) for rel, rec in sorted(files.items())
            },
            **fields,
        }
        if self._began is not None:
            wall, cpu = self._began
            manifest["timing"] = {"wall_s": round(time.perf_counter() - wall, 1),
                                  "cpu_s": round(cpu_seconds() - cpu, 1), "machine": machine()}  # fmt: skip
        self._write_atomic(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return manifest


@dataclass
class StepResult:
    """What a step returns: its artefact and (typed) manifest, whether it was already there, and how long it took."""

    artifact: Artifact
    manifest: Any  # a pipelines.manifests.Manifest
    cached: bool
    seconds: float
