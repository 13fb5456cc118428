"""Launch a step's worker as a subprocess: one process, or N data-parallel ones via torchrun.

`command()` builds the command line and environment (the torchrun contract: RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so that another runner (Dagster Pipes) can start it too.
`launch_worker()` runs a worker of `pipelines.workers`, streaming output line by line to a callback
(stdout or a logger); a non-zero exit raises with the last lines of output, so a failed rank is
visible where it ran. Given a `runner` (the assets pass one that launches through Dagster Pipes),
it hands the command to that instead.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Runner = Callable[[list[str], dict[str, str]], None]  # (argv, extra environment) -> runs to completion or raises


class LaunchError(RuntimeError):
    """The training subprocess failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(module: str, args: list[str], processes: int = 1) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) running `python -m module args` on `processes` local ranks."""
    port = str(free_port())
    if processes > 1:
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            module,
            *args,
        ]
        return argv, {"PYTHONUNBUFFERED": "1"}
    # one rank: no rendezvous needed, the same environment contract as torchrun
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    return [sys.executable, "-m", module, *args], {**env, "PYTHONUNBUFFERED": "1"}


def run(argv: list[str], env: dict[str, str], on_line: Callable[[str], None] = print) -> None:
    """Run a command from `command()` with `env` added to this process's environment."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    full_env = {**os.environ, **env}
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            on_line(line)
        code = proc.wait()
    if code != 0:
        raise LaunchError(f"{' '.join(argv[:6])} ... exited with {code}; last output:\n" + "\n".join(tail))


def worker_command(name: str, store, key: str, processes: int = 1, progress: bool = True) -> tuple[list[str], dict]:
    """(argv, extra environment) of worker `pipelines.workers.<name>` for one artefact on `processes`
    local ranks. The store's storage options travel in PROLOGUE_STORE_OPTIONS, not on the command line
    (where `ps` would show credentials)."""
    args = ["--store", store.url, "--key", key] + ([] if progress else ["--no-progress"])
    argv, env = command(f"pipelines.workers.{name}", args, processes)
    return argv, {**env, "PROLOGUE_STORE_OPTIONS": json.dumps(store.storage_options)}


def launch_worker(
    name: str,
    store,
    key: str,
    processes: int = 1,
    progress: bool = True,
    on_line: Callable[[str], None] = print,
    *,
    runner: Runner | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run worker `pipelines.workers.<name>` on `processes` local ranks (torchrun when more than one),
    with `env` added to its environment: here, streaming its output to `on_line`, or through `runner`."""
    argv, full_env = worker_command(name, store, key, processes, progress)
    full_env.update(env or {})
    if runner is None:
        run(argv, full_env, on_line)
    else:
        runner(argv, full_env)


def ranks_in_sync(model, world: int) -> bool:
    """Whether every rank holds bit-identical weights (what data parallelism promises); collective."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return True
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()]).cpu()
    digest = (flat.sum().item(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum().item())
    gathered: list = [None] * world
    dist.all_gather_object(gathered, digest)
    return all(g == gathered[0] for g in gathered)


@dataclass(frozen=True)
class WorkerContext:
    """Where one worker rank runs: its rank, the world size, its local rank and device."""

    rank: int
    world: int
    local_rank: int
    device: Any

    def say(self, message: str) -> None:
        """A log line from rank 0 only (`pipelines.workers.say`: printed, and sent through Pipes if open)."""
        if self.rank == 0:
            from pipelines.workers import say

            say(message)

    def progress(self, total: int, initial: int = 0, unit: str = "step", enabled: bool = True):
        """A progress bar on rank 0 when stderr is a terminal (log lines carry progress elsewhere)."""
        from tqdm import tqdm

        show = enabled and self.rank == 0 and sys.stderr.isatty()
        return tqdm(total=total, initial=initial, unit=unit, disable=not show)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()


def worker_context(process_group: bool = False) -> WorkerContext:
    """This worker's rank, world size and device from the torchrun environment. CPU ranks on one
    machine split its cores instead of each taking all of them; `process_group` joins the gloo
    (CPU) or NCCL (GPU) group when there are several ranks (DeepSpeed joins its own)."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if process_group and world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return WorkerContext(rank, world, local_rank, device)
