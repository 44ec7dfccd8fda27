"""A real one-node Slurm cluster on 127.0.0.1 for the tests: munged, slurmctld and slurmd (Debian's `munge`
and `slurm-wlm`) started as children of the test with private paths and free ports, so that nothing of the
machine's own Slurm or munge (if any) is touched. Needs root (slurmd runs jobs as their users)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers.procs import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "not root: slurmd must run jobs as root"
    absent = [d for d in (*DAEMONS, "sbatch", "scancel", "squeue", "sinfo") if shutil.which(d) is None]
    return f"not installed: {', '.join(absent)} (apt-get install slurm-wlm munge)" if absent else None


class SlurmCluster:
    def __init__(self):
        # Short: munge's and Slurm's socket paths must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="us-slurm-", dir="/tmp"))
        self.dir.chmod(0o755)  # munge wants every directory above its socket traversable
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "SlurmCluster":
        d = self.dir
        munge = d / "munge"
        munge.mkdir(mode=0o700)
        (munge / "key").write_bytes(os.urandom(1024))
        (munge / "key").chmod(0o400)
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        self._spawn(["munged", "--foreground", "--force", f"--key-file={munge / 'key'}", f"--socket={munge / 'sock'}",
                     f"--pid-file={munge / 'pid'}", f"--log-file={munge / 'log'}", f"--seed-file={munge / 'seed'}"],
                    "munged")
        self._wait(lambda: (munge / "sock").exists(), "munged's socket")
        cpus = os.cpu_count() or 1
        self.conf.write_text(f"""\
ClusterName=understudy-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge / 'sock'}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn(["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)], "slurmd")
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle",
                   "the node to be idle in sinfo")
        return self

    def _spawn(self, argv: list[str], name: str) -> None:
        out = open(self.dir / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                           stdin=subprocess.DEVNULL))

    def _wait(self, cond, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted(self.dir.glob("*.out"))
                                 + sorted(self.dir.glob("*.log")))
                raise RuntimeError(f"no {what}: {'exited: ' + ', '.join(dead) if dead else 'timed out'}\n{logs}")
            time.sleep(0.1)

    def run(self, *argv: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, check=check, env={**self.env, **(env or {})})

    def job_state(self, job: str) -> str | None:
        """The job's state while squeue lists it, else None."""
        out = self.run("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout.strip()
        return out or None

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
