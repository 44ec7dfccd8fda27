"""No crash loops: flags that cannot work are refused before anything loads, and a child that keeps
dying is restarted with a growing delay that `understudy status` shows, with the reason.

    1. `understudy serve --register etcd://...` without the aetcd package: exit 2 at argument time
       (torch not even imported), naming the flag and what to install; `understudy up` with the same
       engine flags refuses the same way before it starts any child;
    2. `understudy up` whose engine cannot start (a model path that does not exist): the engine is
       restarted after 1, 2, 4 s ... (as the primary: no other engine runs); `understudy status --json`
       says how it ended (failed), the error it logged and when the next restart is due; the memory
       service stays up; SIGTERM ends it all.
"""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.helpers.node import Node, logged

# `understudy` as the command runs it, with `import aetcd` failing (as when the package is not installed);
# at exit it says whether torch was imported (it must not be: nothing was loaded).
NO_AETCD = ("import atexit, sys; sys.modules['aetcd'] = None; "
            "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
            "from understudy.cli import main; sys.exit(main())")


def _no_aetcd(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_AETCD, *argv], capture_output=True, text=True, timeout=60)


def test_serve_refuses_etcd_registration_without_aetcd_at_argument_time(tmp_path):
    r = _no_aetcd("serve", "--register", "etcd://127.0.0.1:1", "--socket-dir", str(tmp_path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("understudy serve: error: --register etcd://127.0.0.1:1 needs the aetcd package"), \
        r.stderr
    assert "pip install" in r.stderr and r.stdout.strip() == "torch imported: False", (r.stdout, r.stderr)
    r = _no_aetcd("up", "--socket-dir", str(tmp_path), "--", "--register", "etcd://127.0.0.1:1")
    assert r.returncode == 2 and "needs the aetcd package" in r.stderr, (r.stdout, r.stderr)
    assert not (tmp_path / "node.json").exists()


def test_engine_that_keeps_failing_is_restarted_with_growing_delays():
    node = Node(shadows=0, up_args=("--restart-delay", "1", "--restart-delay-max", "4"),
                engine_args=("--model", "/nonexistent/model.gguf", "--no-progress"))
    try:
        delays = [node.wait(logged("child_restart_scheduled", child="engine-0", failures=n))["delay_s"]
                  for n in (1, 2, 3)]
        assert delays == [1, 2, 4], delays
        state = node.status(raw=True)
        kids = {c["name"]: c for c in state["children"]}
        engine = kids["engine-0"]
        assert engine["starts"] == 3 and engine["last_exit"] == "failed" and engine["last_returncode"] == 1, engine
        assert engine["role"] == "primary", engine  # no other engine runs: a shadow would park on nothing
        node.wait(logged("restarting_as_primary", child="engine-0"))
        assert "FileNotFoundError" in engine["last_error"] and "/nonexistent/model.gguf" in engine["last_error"]
        assert engine["next_restart_at"] > engine["last_exit_at"], engine  # due 4 s after the third exit
        assert kids["memory"]["alive"] and kids["memory"]["starts"] == 1, kids["memory"]
        assert state["device"]["healthy"] is True
        text = node.status_text()
        assert "failed" in text and "last error: " in text and "next restart" in text, text
        node.proc.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=120) == 0
    finally:
        node.close()
