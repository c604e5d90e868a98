"""SLURM -> torchrun environment: run `train.py` unchanged as one SLURM task per rank.

    srun --ntasks-per-node=G python -m launch.slurm_env [--expect-nodes N] -- python train.py [flags]

sets, from the task's SLURM variables, exactly what torchrun would give each worker:

    RANK             = SLURM_PROCID
    WORLD_SIZE       = SLURM_NTASKS
    LOCAL_RANK       = SLURM_LOCALID
    LOCAL_WORLD_SIZE = tasks on this node (SLURM_TASKS_PER_NODE / SLURM_NTASKS_PER_NODE)
    GROUP_RANK, NODE_RANK = SLURM_NODEID
    MASTER_ADDR      = the address of the first node of the step (its NodeAddr in `scontrol`)
    MASTER_PORT      = FSDP_QLORA_MASTER_PORT or 20000 + SLURM_JOB_ID % 20000

then execs the command. Rank 0 hosts the rendezvous store there; `--rdzv-timeout-s` bounds the
wait for the others (fsdp_qlora/distributed/env.py). Also used by `launch.submit`.
Every problem is one line naming the variable and the fix (exit code 2).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

REQUIRED = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID")
PORT_BASE, PORT_SPAN = 20000, 20000


class SlurmEnvError(RuntimeError):
    """The SLURM environment cannot describe a torchrun-style world."""


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list (``gpu[01-03,7],login1``) -> names, in order."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """``2(x3),1`` -> [2, 2, 2, 1] (SLURM_TASKS_PER_NODE's format)."""
    counts: list[int] = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise SlurmEnvError(f"cannot parse SLURM_TASKS_PER_NODE={spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def node_address(name: str, environ: dict) -> str:
    """The address to reach node `name`: FSDP_QLORA_MASTER_ADDR, else Slurm's NodeAddr, else the name."""
    if environ.get("FSDP_QLORA_MASTER_ADDR"):
        return environ["FSDP_QLORA_MASTER_ADDR"]
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True,
                             timeout=30, env=environ)
        found = re.search(r"\bNodeAddr=(\S+)", out.stdout)
        if out.returncode == 0 and found:
            return found.group(1)
    return name


def torchrun_env(environ: dict | None = None, expect_nodes: int | None = None) -> dict[str, str]:
    """The torchrun variables for this SLURM task; raises SlurmEnvError with a one-line fix."""
    environ = dict(os.environ if environ is None else environ)
    missing = [name for name in REQUIRED if not environ.get(name)]
    if missing:
        raise SlurmEnvError(
            f"{', '.join(missing)} not set: launch.slurm_env must run inside a SLURM job step, one task per rank "
            "(srun --ntasks-per-node=GPUS python -m launch.slurm_env -- python train.py ...); outside SLURM use "
            "torchrun")
    nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES") or 1)
    job_nodes = int(environ.get("SLURM_JOB_NUM_NODES") or nodes)
    if expect_nodes and nodes != expect_nodes:
        raise SlurmEnvError(
            f"node-count mismatch: expected {expect_nodes} nodes but this step runs on {nodes} "
            f"(the job has {job_nodes}; SLURM_STEP_NUM_NODES/SLURM_JOB_NUM_NODES): submit with --nodes {expect_nodes}, "
            "or launch the step with srun -N matching the allocation")
    world = int(environ["SLURM_NTASKS"])
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or ""
    counts = tasks_per_node(spec) if spec else [world // nodes] * nodes
    if len(set(counts)) != 1 or sum(counts) != world or len(counts) != nodes:
        raise SlurmEnvError(
            f"uneven tasks: SLURM_NTASKS={world} over {nodes} nodes as {spec or '?'}; every node needs the same number "
            "of ranks: use --ntasks-per-node (not --ntasks)")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST not set: cannot choose the rendezvous host; run inside srun/sbatch "
                            "or set MASTER_ADDR and MASTER_PORT yourself")
    head = expand_hostlist(nodelist)[0]
    port = environ.get("FSDP_QLORA_MASTER_PORT") or str(PORT_BASE + int(environ["SLURM_JOB_ID"]) % PORT_SPAN)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(counts[0]),
        "GROUP_RANK": environ["SLURM_NODEID"],
        "NODE_RANK": environ["SLURM_NODEID"],
        "MASTER_ADDR": node_address(head, environ),
        "MASTER_PORT": port,
    }


def network_env(ifname: str | None) -> dict[str, str]:
    """--network-interface -> the variables gloo and NCCL read (docs/multinode.md)."""
    return {"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": ifname} if ifname else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm_env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect-nodes", type=int, default=None, help="fail unless the step spans this many nodes")
    parser.add_argument("--network-interface", default=None, help="sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME")
    parser.add_argument("--print", action="store_true", help="print the variables as shell exports and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS]: what to exec with them")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        values = {**torchrun_env(expect_nodes=args.expect_nodes), **network_env(args.network_interface)}
    except SlurmEnvError as err:
        print(f"launch.slurm_env: error: {err}", file=sys.stderr)
        return 2
    if args.print or not command:
        print("\n".join(f"export {k}={v}" for k, v in values.items()))
        return 0
    os.environ.update(values)
    sys.stdout.flush()
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
