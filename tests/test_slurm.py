"""Multi-node training on a real Slurm cluster: slurmctld + two slurmd "nodes" on loopback.

The cluster (tests/slurm/cluster.py) runs Debian's slurm-wlm and munge; `.ci/run` installs
them. Jobs train the tiny model across both nodes with gloo on 127.0.0.1: through the sbatch
template (one torchrun per node, c10d rendezvous) and through the submitit launcher (one task
per rank), and survive a preemption (checkpoint, requeue, resume).
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.slurm_env import SlurmEnvError, torchrun_env
from tests.conftest import REPO, subprocess_env
from tests.slurm.cluster import ClusterUnavailable, SlurmCluster, missing_binaries

JOB_TIMEOUT = 240
COMMON = ["--context-length", "128", "--lora-dropout", "0", "--log-every", "1"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} missing): as root, "
                    "`apt-get install slurm-wlm munge` (.ci/run does this) and rerun")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as err:
        cluster.stop()
        pytest.skip(f"cannot start a Slurm cluster here: {err}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def job_env(slurm, tmp_path_factory):
    """What every job step sees: this repo, this python, offline, one model cache for both nodes."""
    env = subprocess_env(tmp_path_factory.mktemp("cache"))
    env.update(slurm.env, PYTHON=sys.executable, GPUS_PER_NODE="2", RDZV_TIMEOUT="120")
    return env


def _sbatch(slurm, job_env, out_dir: Path, train_args: list[str], *sbatch_args: str, **extra_env) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**job_env, **extra_env}
    proc = subprocess.run(["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1",
                           f"--output={out_dir}/slurm-%j.out", *sbatch_args, str(REPO / "launch" / "sbatch.sh"),
                           *train_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _submitit(job_env, folder: Path, train_args: list[str], *launcher_args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "launch.submit", "--nodes", "2", "--cpu-ranks-per-node", "2",
                           "--folder", f"{folder}/%j", "--time", "30", *launcher_args, "--", *train_args],
                          cwd=REPO, env=job_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()[0]


def _finish(slurm, job_id: str, log: str | Path, timeout: float = JOB_TIMEOUT) -> str:
    state = slurm.wait_job(job_id, timeout)
    text = _read_logs(log)
    assert state == "COMPLETED", f"job {job_id}: {state}\n{text[-6000:]}\n{slurm.logs()}"
    return text


def _read_logs(log: str | Path) -> str:
    path = Path(log)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return "\n".join(f.read_text(errors="replace") for f in files if f.is_file() and f.suffix in (".out", ".err"))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for_steps(run_dir: Path, steps: int, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(_metrics(run_dir)) >= steps:
            return
        time.sleep(0.5)
    pytest.fail(f"{run_dir} never logged {steps} steps")


def _skip_requeue_delay(slurm, job_id: str, timeout: float = 120) -> None:
    """Slurm makes a requeued job eligible only ~2 minutes later; an operator may start it now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = slurm.job_state(job_id)
        if state == "PENDING":
            slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            return
        if state in ("RUNNING", "COMPLETED") and slurm.job_field(job_id, "Restarts") not in ("", "0"):
            return
        time.sleep(0.5)
    pytest.fail(f"job {job_id} was never requeued (state {slurm.job_state(job_id)})\n{slurm.logs()}")


def _assert_trained(run_dir: Path, steps: int) -> list[dict]:
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    return rows


# ---- training across two nodes --------------------------------------------------------------
def test_sbatch_two_nodes_hsdp(slurm, job_env, tmp_path):
    run_dir = tmp_path / "run"
    job = _sbatch(slurm, job_env, tmp_path, ["--max-steps", "8", "--output-dir", str(run_dir), *COMMON])
    log = _finish(slurm, job, tmp_path / f"slurm-{job}.out")
    assert slurm.job_field(job, "NodeList") == "node[1-2]"
    # --sharding auto: 2 nodes x 2 ranks (LOCAL_WORLD_SIZE from torchrun) -> HSDP
    assert "sharding: hsdp (dp_replicate=2 x dp_shard=2)" in log
    _assert_trained(run_dir, 8)


def test_submitit_two_nodes(slurm, job_env, tmp_path):
    run_dir = tmp_path / "run"
    job = _submitit(job_env, tmp_path / "submitit", ["--max-steps", "8", "--output-dir", str(run_dir),
                                                     "--sharding", "fsdp", *COMMON])
    log = _finish(slurm, job, tmp_path / "submitit")
    assert slurm.job_field(job, "NodeList") == "node[1-2]"
    assert "sharding: fsdp (dp_shard=4)" in log
    _assert_trained(run_dir, 8)


# ---- preemption: checkpoint, requeue, resume ------------------------------------------------
def _assert_resumed(slurm, job: str, run_dir: Path, log: str, steps: int) -> None:
    assert slurm.job_field(job, "Restarts") == "1", log[-4000:]
    assert "stopped by a signal; checkpoint saved at step" in log, log[-4000:]
    resumed = re.search(r"resumed from \S+step-0*(\d+) at step (\d+)", log)
    assert resumed, log[-4000:]
    rows = _assert_trained(run_dir, steps)  # every step once: continuous across the preemption
    assert 0 < int(resumed.group(2)) < steps
    assert all(r["tokens_per_sec"] > 0 for r in rows)


def test_sbatch_job_preempted_by_scontrol_requeue_resumes(slurm, job_env, tmp_path):
    run_dir, steps = tmp_path / "run", 16  # preempted after step 3: 13 steps of margin
    job = _sbatch(slurm, job_env, tmp_path, ["--max-steps", str(steps), "--save-every", "50",
                                             "--output-dir", str(run_dir), *COMMON])
    _wait_for_steps(run_dir, 3)
    slurm.run("scontrol", "requeue", job)  # what a preemption with PreemptMode=REQUEUE does
    _skip_requeue_delay(slurm, job)
    log = _finish(slurm, job, tmp_path / f"slurm-{job}.out")
    _assert_resumed(slurm, job, run_dir, log, steps)


def test_submitit_job_preempted_by_usr1_requeues_itself(slurm, job_env, tmp_path):
    run_dir, steps = tmp_path / "run", 16  # preempted after step 3: 13 steps of margin
    job = _submitit(job_env, tmp_path / "submitit", ["--max-steps", str(steps), "--save-every", "50",
                                                     "--output-dir", str(run_dir), *COMMON])
    _wait_for_steps(run_dir, 3)
    slurm.run("scancel", "--signal=USR1", job)  # the time-limit warning / a preemption notice
    _skip_requeue_delay(slurm, job)
    log = _finish(slurm, job, tmp_path / "submitit")
    assert "requeue job" in log
    _assert_resumed(slurm, job, run_dir, log, steps)


# ---- clear errors ---------------------------------------------------------------------------
def _no_slurm_env() -> dict:
    return {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}


def test_missing_slurm_variables():
    proc = subprocess.run([sys.executable, "-m", "launch.slurm_env", "--", "true"], cwd=REPO, env=_no_slurm_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("launch.slurm_env: error: SLURM_JOB_ID, SLURM_PROCID") and "srun" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(["bash", str(REPO / "launch" / "sbatch.sh")], cwd=REPO, env=_no_slurm_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "SLURM_JOB_ID not set: submit this script with sbatch" in proc.stderr


def test_torchrun_env_mapping_and_node_count_mismatch():
    env = {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "FSDP_QLORA_MASTER_ADDR": "10.0.0.7", "PATH": os.environ["PATH"]}
    mapped = torchrun_env(env, expect_nodes=2)
    assert mapped == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                      "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": str(20000 + 1234)}
    with pytest.raises(SlurmEnvError, match="node-count mismatch: expected 3 nodes but this step runs on 2"):
        torchrun_env(env, expect_nodes=3)
    with pytest.raises(SlurmEnvError, match="uneven tasks"):
        torchrun_env({**env, "SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "2,1"})


def test_sbatch_node_count_mismatch_fails_fast(slurm, job_env, tmp_path):
    job = _sbatch(slurm, job_env, tmp_path, ["--max-steps", "2", "--output-dir", str(tmp_path / "run")],
                  EXPECT_NODES="3")
    state = slurm.wait_job(job, 60)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "FAILED", log
    assert "node-count mismatch: EXPECT_NODES=3 but the allocation has 2 node(s)" in log
