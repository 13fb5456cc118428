"""What every benchmark script shares: the machine line of its figures, their printout and JSON file."""

import json
from pathlib import Path

import torch

from pipelines.store import machine as store_machine


def machine(threads: bool = False) -> str:
    """CPU model and core count (and torch's thread count, for compute-bound benchmarks): the same
    record a manifest's timing keeps (`pipelines.store.machine`)."""
    m = store_machine()
    line = f"{m['cpu']}, {m['logical_cores']} cores"
    return line + (f", torch threads {torch.get_num_threads()}" if threads else "")


def save_json(path: str, figures: dict) -> None:
    """Write the figures where bench/run_all.py (or the person) asked; nothing when path is empty."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=1) + "\n")


def report(unit: str, rates: list[tuple[str, float]], summary: str, figures: dict, path: str, digits: int = 0) -> None:
    """Print the measured rates side by side, then `summary (workload; machine)`, and save the figures."""
    width = max(len(name) for name, _ in rates) + 4
    print(f"{'':<{width}}{unit:>12}")
    for name, value in rates:
        print(f"{name:<{width}}{value:>12.{digits}f}")
    print(f"{summary}  ({figures['workload']}; {figures['machine']})")
    save_json(path, figures)
