"""common/http_server.warm_streaming: a server's first streamed answer imports nothing on its way.

A real uvicorn server in a fresh interpreter (so nothing is imported yet) serves one streaming route that
reports which modules were imported between its handler's return and its first chunk: the time a
promoted shadow's first token spent there (20-45 ms of anyio's backend, bench/failover.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import httpx
from tests.helpers.procs import free_port

SERVER = textwrap.dedent("""
    import sys
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from understudy.common.http_server import warm_streaming

    app = FastAPI()
    if sys.argv[2] == "warm":
        app.router.on_startup.append(warm_streaming)

    @app.get("/stream")
    async def stream():
        before = set(sys.modules)

        async def lines():
            yield __import__("json").dumps(sorted(set(sys.modules) - before)) + "\\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            print("listening", flush=True)  # the socket accepts connections now

    Server(uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", loop="asyncio")).run()
""")


def _first_answer_imports(warm: bool) -> list[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), "warm" if warm else "cold"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "listening", f"the server exited with {proc.wait()}"
        return json.loads(httpx.get(f"http://127.0.0.1:{port}/stream", timeout=30).text)
    finally:
        proc.kill()
        proc.wait()


def test_a_warmed_server_imports_nothing_on_its_first_streamed_answer():
    assert _first_answer_imports(warm=True) == []


def test_without_warming_the_first_streamed_answer_imports_anyios_backend():
    """The cause, so that this test notices when Starlette stops needing it (and the warming can go)."""
    assert "anyio._backends._asyncio" in _first_answer_imports(warm=False)
