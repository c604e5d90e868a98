"""Submit `train.py` to SLURM with submitit: one task per rank, requeued on preemption.

    python -m launch.submit --nodes 2 --gpus-per-node 8 --partition X -- --model llama-3-70b --output-dir /shared/runs/x
    python -m launch.submit --nodes 2 --cpu-ranks-per-node 2 -- --max-steps 10     # CPU ranks (gloo), no GPUs

Everything after ``--`` is passed to train.py unchanged. Each SLURM task maps its SLURM
variables to torchrun's (launch/slurm_env.py) and runs ``python train.py ...`` as a child.
When SLURM stops the job (time limit signal, preemption, ``scontrol requeue``, ``scancel
--signal=USR1``), the child finishes its step, checkpoints and exits 75; rank 0 then requeues
the job, and the requeued job reruns the same command, which resumes from the newest
checkpoint in --output-dir (so that directory must be on a filesystem every node sees).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from launch.slurm_env import SlurmEnvError, network_env, torchrun_env

REPO = Path(__file__).resolve().parents[1]
EXIT_PREEMPTED = 75  # fsdp_qlora.train.signals.EXIT_PREEMPTED (not imported: keep the launcher light)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _child_setup() -> None:
    # submitit's own time-limit signal (USR2) would kill train.py, which handles TERM/USR1: ignore
    # it there (the parent forwards a TERM). Die with the parent, whatever kills it.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TrainTask:
    """The callable submitit runs in every task (pickled by value: plain attributes only)."""

    def __init__(self, train_args: list[str], expect_nodes: int, network_interface: str | None = None,
                 repo: str = str(REPO), python: str = sys.executable, max_requeues: int = 20,
                 kill_wait_s: float = 300.0):
        self.train_args = list(train_args)
        self.expect_nodes = expect_nodes
        self.network_interface = network_interface
        self.repo = repo
        self.python = python
        self.max_requeues = max_requeues
        self.kill_wait_s = kill_wait_s

    def __call__(self) -> str:
        try:
            env = {**os.environ, **torchrun_env(expect_nodes=self.expect_nodes), **network_env(self.network_interface)}
        except SlurmEnvError as err:
            raise RuntimeError(f"launch.submit: {err}") from None
        rank = int(env["RANK"])
        child = subprocess.Popen([self.python, str(Path(self.repo) / "train.py"), *self.train_args], cwd=self.repo,
                                 env=env, preexec_fn=_child_setup)
        stop = {"signal": None}

        def forward(signum, frame):
            if stop["signal"] is None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
            stop["signal"] = signum

        for sig in STOP_SIGNALS:  # replaces submitit's handlers: this task does the checkpointing
            signal.signal(sig, forward)
        while child.poll() is None:
            time.sleep(0.2)
        rc = child.returncode
        if rc == 0:
            return str(Path(self.repo) / "runs")
        if rc == EXIT_PREEMPTED or stop["signal"] is not None:
            self._requeue_and_wait(rank, rc)
        raise RuntimeError(f"train.py exited with code {rc} on rank {rank}; see the job's stderr")

    def _requeue_and_wait(self, rank: int, rc: int) -> None:
        job_id = os.environ.get("SLURM_JOB_ID", "")
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if rank == 0:
            if restarts >= self.max_requeues:
                raise RuntimeError(f"train.py stopped (exit {rc}) and the job was already requeued {restarts} times")
            # Fails harmlessly when SLURM itself is already requeueing (scontrol requeue, preemption).
            done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
            print(f"launch.submit: checkpoint saved (exit {rc}); requeue job {job_id}: "
                  f"{'ok' if done.returncode == 0 else done.stderr.strip()}", file=sys.stderr, flush=True)
        # The requeue ends this job instance: wait here for SLURM to stop us, so that submitit
        # writes no result and the requeued instance runs the same command again.
        time.sleep(self.kill_wait_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1, help="SLURM nodes")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one rank per GPU")
    parser.add_argument("--cpu-ranks-per-node", type=int, default=0,
                        help="no GPUs: this many CPU (gloo) ranks per node")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--time", type=int, default=24 * 60, help="time limit per job instance, minutes")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank")
    parser.add_argument("--mem-gb", type=int, default=None, help="memory per node, GB")
    parser.add_argument("--job-name", default="fsdp-qlora")
    parser.add_argument("--folder", default="runs/submitit/%j", help="submitit logs and pickles (%%j = job id)")
    parser.add_argument("--network-interface", default=None,
                        help="network interface for gloo and NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)")
    parser.add_argument("--signal-delay-s", type=int, default=180,
                        help="SLURM signals the job this long before its time limit (checkpoint, then requeue)")
    parser.add_argument("--max-requeues", type=int, default=20, help="give up after this many requeues")
    parser.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                        help="extra sbatch option, e.g. --sbatch account=abc --sbatch qos=high")
    parser.add_argument("--wait", action="store_true", help="block until the job finishes; exit 1 if it failed")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py flags")
    return parser


def _ensure_output_dir(train_args: list[str], job_name: str) -> list[str]:
    """A requeued job resumes from --output-dir: fix it at submission time."""
    if any(a == "--output-dir" or a.startswith("--output-dir=") for a in train_args):
        return train_args
    return [*train_args, "--output-dir", str(REPO / "runs" / f"{job_name}-{datetime.now():%Y%m%d-%H%M%S}")]


def submit(args: argparse.Namespace):
    import submitit

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.nodes < 1:
        raise SystemExit("launch.submit: error: --nodes must be >= 1")
    ranks = args.gpus_per_node or args.cpu_ranks_per_node
    if not ranks or (args.gpus_per_node and args.cpu_ranks_per_node):
        raise SystemExit("launch.submit: error: give exactly one of --gpus-per-node or --cpu-ranks-per-node")
    train_args = _ensure_output_dir(train_args, args.job_name)
    # submitit's time-limit signal becomes USR1, which train.py itself handles (save and exit 75).
    os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    # The job unpickles TrainTask by reference (launch.submit): make the checkout importable there.
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    executor = submitit.SlurmExecutor(folder=args.folder, python=sys.executable, max_num_timeout=args.max_requeues)
    extra = dict(item.split("=", 1) if "=" in item else (item, True) for item in args.sbatch)
    params = dict(nodes=args.nodes, ntasks_per_node=ranks, time=args.time, job_name=args.job_name,
                  signal_delay_s=args.signal_delay_s,
                  additional_parameters={"requeue": True, "open-mode": "append", **extra})
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.partition:
        params["partition"] = args.partition
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb:
        params["mem"] = f"{args.mem_gb}G"
    executor.update_parameters(**params)
    task = TrainTask(train_args, expect_nodes=args.nodes, network_interface=args.network_interface,
                     max_requeues=args.max_requeues)
    return executor.submit(task)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    job = submit(args)
    print(job.job_id, flush=True)
    print(f"launch.submit: job {job.job_id}; logs in {job.paths.stdout.parent}", file=sys.stderr, flush=True)
    if args.wait:
        try:
            job.results()  # one result per task
        except Exception as err:  # submitit re-raises the task's failure
            print(f"launch.submit: job {job.job_id} failed: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
