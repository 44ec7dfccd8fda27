"""Who may call what (common/auth.py), on real processes: a tiny-model engine with API keys (a flag, and the
UNDERSTUDY_API_KEY / VLLM_API_KEY environment variables) registered with a frontend that has keys of its own
and CORS; then an `understudy up` node given its own --admin-token-file.

OpenAI routes (/v1/*, /tokenize, /detokenize) answer 401 without a key and 200 with each key; the frontend
reaches the engine with the admin token (not with a client's key); the operator routes (/engine/generate,
/engine/control/*, /registry/*, /admin/*) answer 401 without the admin token and 403 with an API key;
/health, /live, /metrics and /version stay open. X-Request-Id comes back; /tokenize and /detokenize round-trip.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import openai
import pytest

from understudy import __version__
from understudy.common.auth import admin_headers

from tests.helpers.frontend import Frontend, LineProcess, is_event, wait_until
from tests.helpers.procs import ServerProcess, free_port, serve_process, two_free_ports
from tests.helpers.tiny_model import make_tiny_llama

ENV = {"OMP_NUM_THREADS": "1"}
ENGINE_KEYS = ("ek-flag", "ek-env", "ek-vllm")  # --api-key, $UNDERSTUDY_API_KEY, $VLLM_API_KEY
FRONTEND_KEYS = ("fk-one", "fk-two")
ORIGIN = "https://app.example.com"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Stack:
    """A memory service, an engine with keys registered with a frontend with keys."""

    def __init__(self, tmp: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="us-ac-", dir="/tmp"))
        self.tiny = make_tiny_llama(tmp / "tiny")
        self.template = tmp / "template.jinja"
        self.template.write_text(TEMPLATE)
        self.mem = ServerProcess.start("host", self.dir)
        self.frontend = Frontend(str(self.tiny), "--served-model-name", "tiny", "--chat-template", str(self.template),
                                 "--api-key", FRONTEND_KEYS[0], "--api-key", FRONTEND_KEYS[1],
                                 "--allowed-origins", ORIGIN, "--max-model-len", "512")
        port = free_port()
        self.engine = serve_process(self.dir, port, "--model", str(self.tiny), "--served-model-name", "tiny",
                                    "--kv-cache-memory", "8MiB", "--max-model-len", "512",
                                    "--chat-template", str(self.template), "--api-key", ENGINE_KEYS[0],
                                    "--register", self.frontend.url, "--registration-ttl", "2",
                                    env={**ENV, "UNDERSTUDY_API_KEY": ENGINE_KEYS[1], "VLLM_API_KEY": ENGINE_KEYS[2]},
                                    backend="host")
        self.engine_url = f"http://127.0.0.1:{port}"
        self.engine.wait_line(lambda l: '"event": "serving"' in l, timeout=180)
        self.frontend.wait_ready(timeout=120)  # the engine registered: with the admin token

    def close(self):
        self.engine.kill()
        self.frontend.close()
        self.mem.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("access"))
    yield s
    s.close()


def servers(stack: Stack) -> list[tuple[str, tuple[str, ...]]]:
    return [(stack.engine_url, ENGINE_KEYS), (stack.frontend.url, FRONTEND_KEYS)]


def test_openai_routes_need_a_key_and_take_each_one(stack):
    for base, keys in servers(stack):
        for path in ("/v1/models", "/v1/completions", "/tokenize", "/detokenize"):
            r = httpx.post(f"{base}{path}", json={}) if path != "/v1/models" else httpx.get(f"{base}{path}")
            assert r.status_code == 401, (base, path, r.text)
            assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/v1/models", headers=bearer("wrong")).status_code == 401
        for key in keys:  # the official client sends Authorization: Bearer <api_key>
            c = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
            r = c.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
            assert r.usage.completion_tokens == 3  # through the frontend: it reached the engine (admin token)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        # the other side's keys are not ours
        other = FRONTEND_KEYS[0] if keys == ENGINE_KEYS else ENGINE_KEYS[0]
        assert httpx.get(f"{base}/v1/models", headers=bearer(other)).status_code == 401


def test_health_live_metrics_and_version_stay_open(stack):
    for base, _ in servers(stack):
        for path in ("/health", "/live", "/metrics"):
            assert httpx.get(f"{base}{path}").status_code == 200, (base, path)
        assert httpx.get(f"{base}/version").json() == {"version": __version__}


def test_operator_routes_need_the_admin_token(stack):
    token = admin_headers()  # the node's default token file: what the engine and the frontend loaded
    routes = [("POST", stack.engine_url, "/engine/generate", {"token_ids": [1, 2, 3], "sampling": {"max_tokens": 1}}),
              ("POST", stack.engine_url, "/engine/control/sleep", None),
              ("GET", stack.frontend.url, "/registry/engines", None),
              ("POST", stack.frontend.url, "/admin/thresholds", {"waiting": 32}),
              ("DELETE", stack.frontend.url, "/registry/engines/x", None)]
    for method, base, path, body in routes:
        assert httpx.request(method, f"{base}{path}", json=body).status_code == 401, path
        for key in (*ENGINE_KEYS, *FRONTEND_KEYS):  # an API key is no admin credential
            r = httpx.request(method, f"{base}{path}", json=body, headers=bearer(key))
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", (path, r.text)
    r = httpx.post(f"{stack.engine_url}/engine/generate", headers=token,
                   json={"token_ids": [1, 2, 3], "sampling": {"max_tokens": 2, "temperature": 0}})
    assert r.status_code == 200 and sum(len(json.loads(l)["token_ids"]) for l in r.text.splitlines()) == 2
    assert httpx.get(f"{stack.frontend.url}/registry/engines", headers=token).json()["engines"]  # it registered
    assert httpx.post(f"{stack.frontend.url}/admin/thresholds", json={"waiting": 32}, headers=token).status_code == 200
    # the admin token is good on the OpenAI routes too
    assert httpx.get(f"{stack.engine_url}/v1/models", headers=token).status_code == 200


def test_cors_preflight_answers_the_allowed_origin_only(stack):
    ask = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(f"{stack.frontend.url}/v1/chat/completions", headers=ask)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.options(f"{stack.frontend.url}/v1/chat/completions", headers={**ask, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # a simple request from the page gets the header; the engine, with no --allowed-origins, sends none
    r = httpx.get(f"{stack.frontend.url}/v1/models", headers={"Origin": ORIGIN, **bearer(FRONTEND_KEYS[0])})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(f"{stack.engine_url}/v1/models", headers={"Origin": ORIGIN, **bearer(ENGINE_KEYS[0])})
    assert "access-control-allow-origin" not in r.headers


def test_x_request_id_is_echoed_or_made(stack):
    for base, keys in servers(stack):
        r = httpx.post(f"{base}/v1/completions", headers={"X-Request-Id": "trace-42", **bearer(keys[0])},
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
        assert httpx.get(f"{base}/v1/models", headers={"X-Request-Id": "refused-7"}).headers["x-request-id"] == \
            "refused-7"  # a 401 carries it too
        made = {httpx.get(f"{base}/health").headers["x-request-id"] for _ in range(2)}
        assert len(made) == 2 and all(len(m) == 32 for m in made)


def test_tokenize_and_detokenize_round_trip(stack):
    for base, keys in servers(stack):
        http = httpx.Client(base_url=base, headers=bearer(keys[0]), timeout=60)
        r = http.post("/tokenize", json={"model": "tiny", "prompt": "hello world"}).json()
        assert r["count"] == len(r["tokens"]) == 11 and r["max_model_len"] == 512  # byte tokens: one per byte
        assert http.post("/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json() == {
            "prompt": "hello world"}
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                            "return_token_strs": True}).json()
        assert chat["count"] == len("<user>hi\n<assistant>") and len(chat["token_strs"]) == chat["count"]
        assert http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"] == "<user>hi\n<assistant>"
        bad = http.post("/tokenize", json={"prompt": "x", "bogus": 1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "bogus"
        assert http.post("/detokenize", json={"tokens": [10 ** 6]}).status_code == 400
        assert http.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
        http.close()


def test_up_gives_its_admin_token_file_to_every_child(tmp_path):
    """`up` with engines given --admin-token-file: the engine registers with the node's frontend and the
    frontend reaches the engine with that token; the node's default token is refused."""
    tiny = make_tiny_llama(tmp_path / "tiny")
    token_file = tmp_path / "token"
    token_file.write_text("node-secret-token\n")
    token_file.chmod(0o600)
    d = Path(tempfile.mkdtemp(prefix="us-acup-", dir="/tmp"))
    port, fport = two_free_ports(), free_port()
    node = LineProcess([sys.executable, "-m", "understudy", "up", "--backend", "host", "--socket-dir", str(d),
                        "--port", str(port), "--shadows", "0", "--frontend-port", str(fport), "--",
                        str(tiny), "--served-model-name", "tiny", "--kv-cache-memory", "8MiB", "--no-progress",
                        "--admin-token-file", str(token_file), "--api-key", "node-key", "--registration-ttl", "2"],
                       env=ENV, stream="stderr")
    try:
        node.wait_line(is_event("node_up"), timeout=240)
        fe = f"http://127.0.0.1:{fport}"
        wait_until(lambda: httpx.get(f"{fe}/health").status_code == 200, "the node's frontend to be ready", 120)
        c = openai.OpenAI(base_url=f"{fe}/v1", api_key="node-key", max_retries=0, timeout=120)
        assert c.completions.create(model="tiny", prompt="hello", max_tokens=2).usage.completion_tokens == 2
        good, default = bearer("node-secret-token"), admin_headers()
        assert default != good
        for base, path in ((fe, "/registry/engines"), (fe, "/admin/thresholds")):
            assert httpx.get(f"{base}{path}", headers=good).status_code == 200
            assert httpx.get(f"{base}{path}", headers=default).status_code == 403
        r = httpx.post(f"http://127.0.0.1:{port}/engine/generate", headers=good,
                       json={"token_ids": [1, 2], "sampling": {"max_tokens": 1}})
        assert r.status_code == 200, r.text
    finally:
        node.kill(15)
        shutil.rmtree(d, ignore_errors=True)
