"""Launch a training module as a subprocess: one process, or N data-parallel ones via torchrun.

The subprocess's output is streamed line by line to a callback (the Dagster log or stdout); a
non-zero exit raises with the last lines of output, so a failed rank is visible where it ran.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
from collections.abc import Callable


class LaunchError(RuntimeError):
    """The training subprocess failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, args: list[str], processes: int = 1, on_line: Callable[[str], None] = print,
           env: dict[str, str] | None = None) -> None:
    """Run `python -m module args` on `processes` local ranks (torchrun when more than one)."""
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", module, *args]
    else:  # no rendezvous needed; the same env contract as torchrun
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        cmd = [sys.executable, "-m", module, *args]
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            on_line(line)
        code = proc.wait()
    if code != 0:
        raise LaunchError(f"{module} exited with {code}; last output:\n" + "\n".join(tail))
