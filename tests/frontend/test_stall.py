"""A hung engine mid-stream (SIGSTOP): the frontend notices the stall, moves the stream and stops routing
to the engine. Real processes on the CPU, the official openai client.

Two nodes, each a memory server and one engine, behind one frontend (`--stall-timeout 2`). A greedy
stream is run once undisturbed; then again, and after its third chunk the engine serving it is
SIGSTOPped: no token comes for 2 s, the stream moves to the other engine with prompt + tokens so far and
ends with exactly the undisturbed text; the frontend's /health shows the stopped engine not routable and
its metrics count the stall. After SIGCONT the engine shows progress (idle once it dropped the abandoned
request) and is routable again.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.helpers.frontend import (BACKEND, Engine, Frontend, ServerProcess, is_event, metric, wait_until)

PROMPT = "Once upon a time, in a small town by the river,"
MAX_TOKENS = 32
STALL_S = "2"


@pytest.fixture(scope="module")
def setup():
    dirs = [Path(tempfile.mkdtemp(prefix="us-st-", dir="/tmp")) for _ in range(2)]
    mems, engines, frontend = [], [], None
    try:
        frontend = Frontend("--stall-timeout", STALL_S, "--health-timeout", "1")
        mems = [ServerProcess.start(BACKEND, d) for d in dirs]
        # A lease longer than the test: the stopped engine's record stays (the helper's 2 s would let it go).
        engines = [Engine(d, "--registration-ttl", "60", register=(frontend.url,)) for d in dirs]
        for e in engines:
            e.wait_serving()
            e.wait_for(is_event("registered"))
        wait_until(lambda: sum(e["routable"] for e in frontend.engines().values()) == 2, "both engines routable",
                   timeout=120)
        yield frontend, engines
    finally:
        for e in engines:
            if e.alive:
                os.kill(e.proc.pid, signal.SIGCONT)
            e.close()
        if frontend is not None:
            frontend.close()
        for m in mems:
            if m.proc.poll() is None:
                m.stop()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def stream(frontend: Frontend, model: str):
    return frontend.client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})


def test_sigstopped_engine_mid_stream_the_stream_moves_and_the_engine_gets_no_work(setup):
    frontend, engines = setup
    model = engines[0].model
    reference = "".join(c.choices[0].text for c in stream(frontend, model))

    chunks, stopped = [], None
    try:
        for chunk in stream(frontend, model):
            chunks.append(chunk.choices[0].text)
            if len(chunks) == 3:
                serving = [e for e in frontend.engines().values() if e["inflight"] == 1]
                assert len(serving) == 1, frontend.engines()
                stopped = serving[0]
                os.kill(stopped["pid"], signal.SIGSTOP)
        assert "".join(chunks) == reference
        engine = frontend.engines()[stopped["id"]]
        assert not engine["routable"] and engine["status"] in ("SUSPECT", "UNREACHABLE"), engine
        m = frontend.metrics()
        assert metric(m, "understudy_frontend_migrations_total", reason="stalled") == 1, m
        assert metric(m, "understudy_frontend_stalled_streams_total") == 1
        assert frontend.wait_for(is_event("engine_suspect", id=stopped["id"]))
        assert frontend.health()[0] == 200  # the other engine serves
    finally:
        if stopped is not None:
            os.kill(stopped["pid"], signal.SIGCONT)
    # Back: once it has dropped the abandoned request it is idle, which is progress enough.
    wait_until(lambda: frontend.engines()[stopped["id"]]["routable"], "the resumed engine to be routable",
               timeout=60)
    assert frontend.wait_for(is_event("engine_suspect_cleared", id=stopped["id"]))["how"] == "idle"
