"""CRIU: dump a process tree into an image directory and restore it.

The flags, for an engine that holds a listening TCP socket, a (possibly waiting) flock on the
failover lock file, pipes or files as stdio, and no memory-service connection (quiesce closed them):

* `--tcp-close`: established TCP connections (an HTTP keep-alive, a discovery client) are neither
  dumped nor blocked, and come back closed; the listening socket is dumped and restored bound.
  Without it a connection the engine has not closed yet makes the dump fail.
* `--file-locks`: a flock the process holds is dumped and taken again on restore (an active engine
  that sleeps holds the failover lock). A *waiting* flock is a blocked syscall, not a lock: CRIU
  interrupts it and the restored thread restarts it (checked by tests/snapshot: the restored shadow
  gets the lock when the active engine dies).
* `--shell-job` when the engine shares its session with processes outside the tree (started from a
  shell or a test); `understudy up` starts engines as session leaders, which need none.
* dump `--leave-running`: the engine goes on (it is resumed after the dump).
* restore `--restore-detached`, `--pidfile`, `--inherit-fd fd[N]:KEY` for stdio pipes, sockets and
  terminals (dumped `--external tty[rdev:dev]`): the restored engine writes to the restoring
  process's stdout / stderr.
* No `--ext-unix-sk`: a connection to another process's Unix socket cannot come back; quiesce
  closed them all, and a dump that still finds one fails naming it.

Logs (dump.log, restore.log) stay in the image directory. CRIU needs root, or CAP_SYS_ADMIN +
CAP_CHECKPOINT_RESTORE and friends (scripts/install-criu.sh's wrapper uses sudo -n otherwise).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

REPO_CRIU = Path(__file__).resolve().parents[3] / ".criu" / "bin" / "criu"  # scripts/install-criu.sh


class CriuError(RuntimeError):
    """criu failed: the message ends with the errors from its log."""


class CriuMissing(CriuError):
    pass


def find_criu(explicit: str | None = None) -> str:
    """The criu command: `explicit`, $UNDERSTUDY_CRIU, $UNDERSTUDY_CRIU_PREFIX/bin/criu, ./.criu/bin/criu
    of a source checkout, or criu on PATH."""
    candidates = [explicit, os.environ.get("UNDERSTUDY_CRIU")]
    if os.environ.get("UNDERSTUDY_CRIU_PREFIX"):
        candidates.append(str(Path(os.environ["UNDERSTUDY_CRIU_PREFIX"]) / "bin" / "criu"))
    candidates += [str(REPO_CRIU), shutil.which("criu")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise CriuMissing("no criu found: run scripts/install-criu.sh (installs CRIU >= 4.2 into ./.criu), or set "
                      "UNDERSTUDY_CRIU to a criu command")


def version(criu: str) -> str:
    out = subprocess.run([criu, "--version"], capture_output=True, text=True, timeout=30).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Version:")), "?")


def _failure(what: str, proc: subprocess.CompletedProcess, log: Path) -> CriuError:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [line for line in lines if "Error" in line or "error" in line][-12:] or lines[-12:]
    output = (proc.stdout + proc.stderr).strip()[-1500:]
    return CriuError(f"criu {what} failed (exit {proc.returncode}); {log}:\n" + "\n".join(errors)
                     + (f"\n{output}" if output else ""))


def dump(pid: int, images: Path, *, shell_job: bool, leave_running: bool = True, external: list[str] = (),
         criu: str | None = None, verbosity: int = 2, timeout: float = 600) -> float:
    """Dump the process tree of `pid` into `images` (emptied first). Returns the seconds it took.

    `external`: resources left out of the image, inherited on restore (a terminal: 'tty[rdev:dev]')."""
    criu = criu or find_criu()
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    cmd = [criu, "dump", "--tree", str(pid), "--images-dir", str(images), "--log-file", "dump.log",
           f"-v{verbosity}", "--tcp-close", "--file-locks"]
    cmd += ["--leave-running"] if leave_running else []
    cmd += ["--shell-job"] if shell_job else []
    for key in external:
        cmd += ["--external", key]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    if proc.returncode != 0:
        raise _failure("dump", proc, images / "dump.log")
    return time.perf_counter() - t0


def restore(images: Path, *, shell_job: bool, inherit: dict[int, str], criu: str | None = None,
            verbosity: int = 2, timeout: float = 600) -> int:
    """Restore the tree dumped into `images`, detached; returns the root's pid.

    `inherit` maps file descriptors of this process to the CRIU keys ('pipe:[123]', 'socket:[45]')
    they stand in for (the restored process gets them instead of the dumped pipes / sockets)."""
    criu = criu or find_criu()
    pidfile = images / "restored.pid"
    pidfile.unlink(missing_ok=True)
    cmd = [criu, "restore", "--images-dir", str(images), "--log-file", "restore.log", f"-v{verbosity}",
           "--restore-detached", "--pidfile", str(pidfile), "--tcp-close", "--file-locks"]
    cmd += ["--shell-job"] if shell_job else []
    for fd, key in inherit.items():
        cmd += ["--inherit-fd", f"fd[{fd}]:{key}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout,
                          pass_fds=tuple(inherit))
    if proc.returncode != 0:
        raise _failure("restore", proc, images / "restore.log")
    return int(pidfile.read_text().strip())
