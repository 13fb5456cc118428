"""Train `ar_model` across several nodes, started from node 0 (see deploy/multinode.md).

Missing upstream artefacts (token dataset, tokenizer, shards) are materialised first, each announced;
then `pipelines.train_ar.train_ar()` writes `spec.json`, hands the worker command
(`pipelines.workers.ar`) to a runner and, when the runner returns, commits the manifest. Its built-in runner is
one node (`torchrun --nproc_per_node`). This script passes a runner that prints the launch command
of nodes 1..N-1, runs node 0's share itself (it waits at the rendezvous until every node has
joined) and returns when all ranks are done. No ssh between nodes is needed.

    # torchrun: N nodes with ar_train.processes / N ranks each
    python deploy/train_ar_multinode.py --profile imagenet256-b --variant prologue \\
        --nodes 2 --master-addr node-0 --set ar_train.processes=16
    # the DeepSpeed launcher: nodes and ranks per node from a hostfile (deploy/hostfile.example)
    python deploy/train_ar_multinode.py --profile imagenet256-b --variant prologue \\
        --hostfile deploy/hostfile --master-addr node-0 --set ar_train.processes=16

`ar_train.processes` is the total number of ranks: it is part of the cache key and of the global
batch. The store (PROLOGUE_STORE or --store) must be one every node reaches, e.g. S3.
"""

import argparse
import os
import re
import shlex
import sys

from pipelines.launch import run
from pipelines.plan import Plan
from pipelines.profiles import VARIANTS, load_profile
from pipelines.runner import run_missing
from pipelines.store import Store
from pipelines.train_ar import train_ar

MODULE = "pipelines.workers.ar"
# The launchers set these per rank; the one-rank environment of pipelines.launch.command() must not leak in.
RANK_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def hostfile_slots(path: str) -> list[int]:
    """Ranks per node from a DeepSpeed hostfile (`<host> slots=<n>` lines, `#` comments)."""
    slots = []
    for line in open(path).read().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"\S+\s+slots=(\d+)", line)
            if m is None:
                raise ValueError(f"{path}: expected '<host> slots=<n>', got {line!r}")
            slots.append(int(m.group(1)))
    return slots


def node_command(args, worker: list[str], node: int, nodes: int, per_node: int) -> list[str]:
    """The launch command line of one node; node 0 hosts the rendezvous at master_addr:master_port."""
    where = [f"--master_addr={args.master_addr}", f"--master_port={args.master_port}"]
    if args.hostfile:  # deepspeed --no_ssh: this node's share of the hostfile, started locally
        launcher = ["-m", "deepspeed.launcher.runner", f"--hostfile={args.hostfile}", "--no_ssh", f"--node_rank={node}"]
        # --no_local_rank: the worker reads LOCAL_RANK from the environment, it takes no --local_rank flag
        return [sys.executable, *launcher, *where, "--no_local_rank", "--module", MODULE, *worker]
    launcher = ["-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={node}"]
    return [sys.executable, *launcher, f"--nproc_per_node={per_node}", *where, "-m", MODULE, *worker]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=os.environ.get("PROLOGUE_PROFILE", "fashion32"))
    p.add_argument("--variant", required=True, choices=VARIANTS)
    p.add_argument("--store", default=None, help="store URL shared by all nodes (default: $PROLOGUE_STORE)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    nodes_from = p.add_mutually_exclusive_group(required=True)
    nodes_from.add_argument("--nodes", type=int, help="torchrun on this many nodes")
    nodes_from.add_argument("--hostfile", help="the DeepSpeed launcher on the nodes of this hostfile")
    p.add_argument("--master-addr", required=True, help="node 0's address as the other nodes reach it")
    p.add_argument("--master-port", type=int, default=29500)
    args = p.parse_args(argv)

    profile = load_profile(args.profile, args.overrides)
    total = profile.ar_train.processes
    if args.hostfile:
        slots = hostfile_slots(args.hostfile)
        nodes, per_node = len(slots), max(slots, default=0)
        if sum(slots) != total:
            p.error(f"{args.hostfile} has {sum(slots)} slots, ar_train.processes is {total}")
    else:
        nodes, per_node = args.nodes, total // max(args.nodes, 1)
        if nodes < 1 or total % nodes:
            p.error(f"ar_train.processes={total} does not split evenly over {nodes} nodes")

    def runner(argv: list[str], env: dict[str, str]) -> None:
        worker = argv[argv.index(MODULE) + 1 :]  # --store ... --key ...
        extra = {k: v for k, v in env.items() if k not in RANK_ENV}
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in extra.items())
        for node in range(1, nodes):
            cmd = shlex.join(node_command(args, worker, node, nodes, per_node))
            print(f"==> on node {node}, in the project directory with the same environment, run:\n{prefix}{cmd}")
        print(f"==> node 0: starting its ranks ({total} in all); they wait until every node has joined", flush=True)
        run(node_command(args, worker, 0, nodes, per_node), extra)

    plan = Plan.from_listing(profile, Store(args.store))
    run_missing(plan, "token_dataset", [args.variant], progress=False)  # on this node, announced
    result = train_ar(plan, args.variant, on_log=print, progress=False, runner=runner)
    print(f"{args.variant}: {'cached' if result.cached else 'trained'} -> {result.artifact.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
