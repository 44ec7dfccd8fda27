"""`understudy up --frontend-port`: a node whose engines register with a frontend it runs itself.

One supervisor on the CPU: memory service, active engine, one shadow and the frontend. A stream through
the frontend survives the active engine's SIGKILL (it moves to the promoted shadow of the same node);
the supervisor's replacement shadow registers; SIGTERM stops everything with exit code 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import openai

from tests.helpers.frontend import LineProcess, event, free_port, is_event, wait_until
from tests.helpers.procs import two_free_ports

ENGINE_ARGS = ["--kv-cache-memory", "64MiB", "--max-model-len", "512", "--no-progress", "--registration-ttl", "2"]


def test_up_runs_a_frontend_that_survives_the_active_engines_death():
    d = Path(tempfile.mkdtemp(prefix="us-upfe-", dir="/tmp"))
    port, fport = two_free_ports(), free_port()
    node = LineProcess([sys.executable, "-m", "understudy", "up", "--backend", "host", "--socket-dir", str(d),
                        "--port", str(port), "--shadows", "1", "--frontend-port", str(fport), "--", *ENGINE_ARGS],
                       env={"OMP_NUM_THREADS": "1"}, stream="stderr")
    import httpx

    http = httpx.Client(base_url=f"http://127.0.0.1:{fport}", timeout=60)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{fport}/v1", api_key="-", max_retries=0, timeout=120)
    try:
        node.wait_line(is_event("node_up"), timeout=300)

        def engines() -> dict[str, dict]:
            r = http.get("/health")
            return {e["role"]: e for e in r.json()["engines"]} if r.status_code == 200 else {}

        view = wait_until(lambda: (v := engines()) and {e["status"] for e in v.values()} == {"ACTIVE", "STANDBY"}
                          and v, "the frontend to see the active engine and the shadow", 120)
        assert view["primary"]["node"] == view["shadow"]["node"] and view["primary"]["url"].endswith(str(port))
        model = http.get("/v1/models").json()["data"][0]["id"]
        kw = dict(model=model, prompt="The capital of France is", max_tokens=20, temperature=0,
                  extra_body={"ignore_eos": True})
        reference = client.completions.create(**kw).choices[0].text
        stream = client.completions.create(**kw, stream=True)
        got = [next(stream).choices[0].text for _ in range(3)]
        os.kill(view["primary"]["pid"], signal.SIGKILL)
        got += [c.choices[0].text for c in stream]
        assert "".join(got) == reference  # moved to the promoted shadow: nothing lost, nothing repeated
        moves = [e for e in map(event, list(node.lines)) if e.get("event") == "migrating"]
        assert len(moves) == 1 and moves[0]["same_node"] and moves[0]["child"] == "frontend", moves
        # The supervisor's replacement parks as the new shadow and registers; the dead engine's lease ends.
        def replaced() -> bool:
            r = http.get("/health")
            states = {e["pid"]: e["status"] for e in r.json()["engines"]} if r.status_code == 200 else {}
            return (len(states) == 2 and states.get(view["shadow"]["pid"]) == "ACTIVE"
                    and "STANDBY" in states.values() and view["primary"]["pid"] not in states)

        wait_until(replaced, "the promoted shadow and its replacement in the frontend's view", 180)
        node.proc.send_signal(signal.SIGTERM)
        assert node.wait(timeout=120) == 0
    finally:
        if node.proc.poll() is None:  # SIGTERM: the supervisor stops its children (own process groups) too
            node.kill(signal.SIGTERM)
        http.close()
        client.close()
        shutil.rmtree(d, ignore_errors=True)
