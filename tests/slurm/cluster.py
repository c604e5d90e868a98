"""A real two-node Slurm cluster on one machine, for the test suite.

munged, slurmctld and two slurmd daemons (``slurmd -N node1``, ``slurmd -N node2``, each on its
own port) on loopback, all state, sockets and logs in one temp directory, everything as the
current user (root in CI). The packages are Debian's ``slurm-wlm`` and ``munge``; `.ci/run`
installs them. Used by tests/test_slurm.py as a session fixture; by hand:

    python -m tests.slurm.cluster /tmp/slurm     # start, print the SLURM_CONF to export, wait for ^C
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NODES = ("node1", "node2")
CPUS_PER_NODE = 4  # declared (SlurmdParameters=config_overrides): the jobs' ranks are tiny
PARTITION = "debug"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "srun", "sacct")


class ClusterUnavailable(RuntimeError):
    """Slurm cannot run here (packages missing and not installable): tests skip with this."""


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _which(name: str) -> str:
    found = shutil.which(name) or str(Path("/usr/sbin", name))
    if not Path(found).exists():
        raise ClusterUnavailable(f"{name} not found")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- setup -----------------------------------------------------------------------------
    def write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        for node in NODES:
            (r / "spool" / node).mkdir(exist_ok=True)
        self.root.chmod(0o755)  # munge wants its socket's directory reachable by all
        ctld_port = _free_port()
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={_free_port()} "
            f"CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN" for node in NODES)
        self.conf.write_text(f"""\
ClusterName=fsdpqlora
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={_user()}
SlurmdUser={_user()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=120
SchedulerParameters=defer_batch
{node_lines}
PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        (r / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        missing = missing_binaries()
        if missing:
            raise ClusterUnavailable(f"Slurm/munge binaries missing: {', '.join(missing)} "
                                     "(apt-get install slurm-wlm munge, as .ci/run does)")
        self.write_config()
        self._start_munge()
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        time.sleep(1)
        for node in NODES:
            self._spawn([_which("slurmd"), "-D", "-f", str(self.conf), "-N", node], f"slurmd-{node}")
        self.wait_idle(timeout)
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run([_which("munged"), f"--key-file={key}", f"--socket={self.root}/munge.socket",
                        f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/log/munged.log",
                        f"--seed-file={self.root}/munged.seed", "--force"],
                       check=True, capture_output=True, text=True, timeout=30)

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"{proc.args[0]} exited ({proc.returncode}):\n{self.logs()}")
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = out.stdout.strip()
            if out.returncode == 0 and all(f"{node} idle" in states for node in NODES):
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"nodes not idle after {timeout:.0f}s (sinfo: {states!r}):\n{self.logs()}")

    # -- use -------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return fields.get("JobState", "UNKNOWN")

    def job_field(self, job_id: str, name: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return fields.get(name, "")

    def wait_job(self, job_id: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                             "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")) -> str:
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1)
        return state

    def logs(self, tail: int = 30) -> str:
        parts = []
        for file in sorted((self.root / "log").glob("*")):
            lines = file.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"== {file.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        self.run("scancel", "--full", "--user", _user(), check=False)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        pid_file = self.root / "munged.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fsdp-qlora-slurm")
    root.mkdir(parents=True, exist_ok=True)
    cluster = SlurmCluster(root).start()
    print(f"export SLURM_CONF={cluster.conf}   # sinfo, sbatch, squeue ... ; ^C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
