"""Bad input on the HTTP APIs: the engine's and the frontend's OpenAPI schemas fuzzed with schemathesis, and
slow or abusive clients, against real processes.

One memory server, one `understudy serve` on the CPU (the default model, --kv-cache-memory 64MiB,
--max-model-len 512) registered with one `understudy frontend`, for the whole module. `schemathesis run`
(a subprocess: its own pytest plugin does not work with pytest 9) fuzzes every operation of each app:
the coverage phase (boundary and type-violating values, missing fields, wrong types) and FUZZ_EXAMPLES
random cases per operation, valid and invalid. Every answer must come within HANG_S, never be a 5xx,
carry a status and content type the schema lists (400, not FastAPI's 422, for a bad field) and be a 4xx
for data the schema forbids.

Cases stay quick and the servers stay as they were (tests/helpers/fuzz_hooks.py): a max_tokens the engine
would generate in full becomes 1..2 (too-large ones stay: they must get 400), --default-max-tokens is 2;
after each case of a route that changes state the state is put back: a sleeping engine is woken and a
quiesced one resumed (resume's `timeout` is bounded to 1 s), the frontend's thresholds reset and every
fuzzed registration deleted (the real engine's stays: the fuzzer cannot guess its id). The engine's
routes and the frontend's are fuzzed at the same time (two cores), the engine's control routes after them,
alone: a sleeping engine answers 503 by design, and the frontend's requests with it.

Then the engine and the frontend still answer /health, a greedy completion through each is the one they
gave before, and neither logged a traceback. Last, slow clients (slowloris), an oversized header, idle
connections and --limit-concurrency, with raw sockets.

UNDERSTUDY_FUZZ_EXAMPLES (default 10) sets the random cases per operation; the run is deterministic (the
same cases every run, so CI is stable) unless UNDERSTUDY_FUZZ_SEED is set (a seed, to explore).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from understudy.common.auth import admin_headers

from tests.helpers.frontend import Engine, Frontend, ServerProcess, wait_until

pytestmark = pytest.mark.timeout(300)

FUZZ_EXAMPLES = int(os.environ.get("UNDERSTUDY_FUZZ_EXAMPLES", "10"))
FUZZ_SEED = os.environ.get("UNDERSTUDY_FUZZ_SEED")
HANG_S = 30.0  # no answer within this: a hang
MAX_MODEL_LEN = 512
MAX_TOKENS = 2  # what a generating case may ask for at most
HEADER_TIMEOUT = 2.0
KEEP_ALIVE = 1.0
MAX_HEADER_BYTES = 8192
LIMIT_FLAGS = ("--header-timeout", str(HEADER_TIMEOUT), "--timeout-keep-alive", str(KEEP_ALIVE),
               "--max-header-bytes", str(MAX_HEADER_BYTES))
PROMPT = "The capital of France is"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "negative_data_rejection")
HOOKS = Path(__file__).parent / "helpers" / "fuzz_hooks.py"
SCHEMATHESIS = [sys.executable, "-m", "schemathesis.cli"]


class Stack:
    engine = frontend = mem = None

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="us-fz-", dir="/tmp"))  # short: unix socket paths are limited
        try:
            self.mem = ServerProcess.start("host", self.dir)
            self.frontend = Frontend("--default-max-tokens", str(MAX_TOKENS), "--registry-max-ttl", "5",
                                     *LIMIT_FLAGS)
            self.engine = Engine(self.dir, "--default-max-tokens", str(MAX_TOKENS), "--standby-wait", "1",
                                 "--max-request-bytes", "32768", *LIMIT_FLAGS, register=(self.frontend.url,))
            self.engine.wait_serving()
            self.frontend.wait_ready()
        except BaseException:
            self.close()
            raise
        self.model = self.engine.model
        self.engine_id = self.engine.id

    def completion(self, base: str) -> dict:
        r = httpx.post(f"{base}/v1/completions", json={"model": self.model, "prompt": PROMPT, "max_tokens": 6,
                                                        "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    def close(self):
        for proc in (self.engine, self.frontend):
            if proc is not None:
                proc.close()
        if self.mem is not None:
            self.mem.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(_tokenizer_future):
    s = Stack()
    s.before = {"engine": s.completion(s.engine.url), "frontend": s.completion(s.frontend.url)}
    try:
        yield s
    finally:
        s.close()


def schemathesis(stack: Stack, base: str, tmp_path: Path, *select: str) -> subprocess.Popen:
    """`schemathesis run` over one app's /openapi.json (operations as `select` says), started."""
    seed = ["--seed", FUZZ_SEED, "--generation-database", "none"] if FUZZ_SEED else ["--generation-deterministic"]
    argv = [*SCHEMATHESIS, "run", f"{base}/openapi.json", *select, "--checks", CHECKS, "--phases",
            "examples,coverage,fuzzing", "--max-examples", str(FUZZ_EXAMPLES), *seed, "--workers", "1",
            "--request-timeout", str(HANG_S), "--max-response-time", str(HANG_S), "--suppress-health-check", "all",
            "--no-color", "--header", f"Authorization: {admin_headers()['Authorization']}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "UNDERSTUDY_FUZZ_BASE": base,
           "UNDERSTUDY_FUZZ_MODEL": stack.model, "UNDERSTUDY_FUZZ_MAX_TOKENS": str(MAX_TOKENS),
           "UNDERSTUDY_FUZZ_MAX_MODEL_LEN": str(MAX_MODEL_LEN), "UNDERSTUDY_FUZZ_KEEP_ENGINE": stack.engine_id}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def passed(*runs: subprocess.Popen) -> None:
    """Every run ended with no failed check; else the test fails with the reports (cases and curl lines)."""
    t0 = time.monotonic()
    try:
        reports = [(run, run.communicate(timeout=240)[0]) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:  # timed out (a hang the per-request timeout did not catch)
                run.kill()
                run.wait()
    for run, out in reports:
        print(out[-2500:], f"\n({time.monotonic() - t0:.1f} s)")
    bad = [out[-12000:] for run, out in reports if run.returncode != 0]
    assert not bad, "schemathesis found problems:\n" + "\n\n".join(bad)


# -- the fuzzing ------------------------------------------------------------------------------------

def test_fuzz_the_apis(stack, tmp_path):
    """Both apps at once (two cores); the engine's control routes wait (a sleeping engine would make the
    frontend's answers 503s)."""
    passed(schemathesis(stack, stack.engine.url, tmp_path / "engine", "--exclude-path-regex", "^/engine/control/"),
           schemathesis(stack, stack.frontend.url, tmp_path / "frontend"))


def test_fuzz_the_engine_control_routes(stack, tmp_path):
    passed(schemathesis(stack, stack.engine.url, tmp_path, "--include-path-regex", "^/engine/control/"))


# -- 3. still serving, the same answers ------------------------------------------------------------

def test_still_serving_after_the_fuzzing(stack):
    assert stack.engine.http.get("/health").status_code == 200
    wait_until(lambda: stack.frontend.health()[0] == 200, "the frontend to route to the engine again", 30)
    assert {"engine": stack.completion(stack.engine.url), "frontend": stack.completion(stack.frontend.url)} \
        == stack.before
    assert stack.engine.alive and stack.frontend.alive
    for proc in (stack.engine, stack.frontend):
        bad = [line for line in proc.proc.lines if "Traceback" in line or "Exception in ASGI" in line]
        assert not bad, "\n".join(bad[:3] + proc.proc.lines[-30:])


# -- what the fuzzing found: each fix, as the 4xx it gives now -----------------------------------

def _post(base: str, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{base}{path}", content=body, headers={"content-type": "application/json",
                                                                  **admin_headers()}, timeout=60)
    return httpx.post(f"{base}{path}", json=body, timeout=60, headers=admin_headers(), **kw)


def _is_400(r: httpx.Response, param: str | None = "?") -> dict:
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == 400, err
    if param != "?":
        assert err["param"] == param, err
    return err


def test_tiny_temperature_and_top_p_do_not_kill_the_engine(stack):
    """temperature=1e-300 (0 in float32) gave NaN probabilities: the step raised and the engine died
    (exit 5, step_error) on one request. top_p=1e-300 dropped every token, the same way."""
    greedy = stack.completion(stack.engine.url)
    for extra in ({"temperature": 1e-300}, {"top_p": 1e-300, "temperature": 1.0, "seed": 3}):
        for base in (stack.engine.url, stack.frontend.url):
            body = {"model": stack.model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **extra}
            r = _post(base, "/v1/completions", body)
            assert r.status_code == 200, (extra, r.text)
            # below GREEDY_BELOW: greedy; a top_p of ~0 keeps the top token only: greedy too
            assert r.json()["choices"][0]["text"] == greedy["text"], extra
    r = _post(stack.engine.url, "/engine/generate", {"token_ids": [1, 2, 3], "sampling": {"temperature": 1e-300}})
    assert r.status_code == 200 and '"finish_reason": "length"' in r.text, r.text
    assert stack.engine.http.get("/health").json()["state"] == "ACTIVE"


def test_the_sampler_never_draws_from_nan():
    import torch

    from understudy.common.params import SamplingParams
    from understudy.engine.core.sampling import sample
    from understudy.engine.core.sequence import Sequence

    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=1e-300), SamplingParams(top_p=1e-300), SamplingParams(top_p=1e-46, top_k=3),
              SamplingParams(temperature=1e-38, top_p=0.5)]
    out = sample(logits, [Sequence(str(i), [1], p, seed=i) for i, p in enumerate(params)]).token_ids.tolist()
    assert out[0] == int(logits[0].argmax()) and out[1] == int(logits[1].argmax())  # top_p ~0: the top token
    assert out[2] == int(logits[2].argmax()) and out[3] == int(logits[3].argmax())


@pytest.mark.parametrize("app", ["engine", "frontend"])
def test_bad_types_are_400s(stack, app):
    """pydantic's lax mode served what the schema forbids: false or "5" for an integer, 1.0 for n, [false]
    as token ids, NaN / Infinity (Python's json takes them) for floats, a seed torch cannot take."""
    base = getattr(stack, app).url
    ok = {"model": stack.model, "prompt": "hi", "max_tokens": 1}
    for field, value in [("max_tokens", False), ("max_tokens", "5"), ("n", 1.0), ("prompt", [False]),
                         ("seed", 1 << 64), ("seed", -(1 << 63) - 1), ("stream", "yes"), ("top_k", 1.5),
                         ("ignore_eos", 0)]:
        _is_400(_post(base, "/v1/completions", {**ok, field: value}),
                param=field if field != "prompt" else "?")
    # "" encodes to no token: the frontend passed on the engine's complaint about its own field, token_ids
    assert "empty" in _is_400(_post(base, "/v1/completions", {**ok, "prompt": ""}), param="prompt")["message"]
    for raw in ['{"prompt": "hi", "temperature": NaN}', '{"prompt": "hi", "top_p": Infinity}']:
        assert "finite number" in _is_400(_post(base, "/v1/completions", raw))["message"]
    chat = {"model": stack.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    _is_400(_post(base, "/v1/chat/completions", {**chat, "logprobs": 0}), param="logprobs")
    _is_400(_post(base, "/v1/chat/completions", {**chat, "max_completion_tokens": True}),
            param="max_completion_tokens")
    assert _post(base, "/v1/chat/completions", chat).status_code == 200
    assert _post(base, "/v1/completions", {**ok, "temperature": 1}).status_code == 200  # an integer is a number


def test_engine_only_bodies_are_strict_too(stack):
    base = stack.engine.url
    _is_400(_post(base, "/engine/generate", {"token_ids": [1, 2], "sampling": {"resumed_tokens": False}}))
    _is_400(_post(base, "/engine/generate", {"token_ids": [True]}))
    _is_400(_post(base, "/engine/control/resume", {"timeout": False}), param="timeout")
    # An unbounded wait held the connection for as long as it said (resume of a sleeping engine).
    _is_400(_post(base, "/engine/control/resume", {"activate": True, "timeout": 1e9}), param="timeout")
    assert _post(base, "/engine/control/resume", {"activate": True, "timeout": 1}).json()["state"] == "ACTIVE"


def test_resumed_tokens_beyond_the_prompt_is_400(stack):
    """The engine once made seed_offset (now resumed_tokens) random draws (2.3 ms each on a CPU) on its thread
    before the request started: {"seed_offset": 1000000} held every request for 40 minutes. The resumed
    tokens are the prompt's tail, so there are fewer of them than token_ids."""
    base = stack.engine.url
    t0 = time.monotonic()
    err = _is_400(_post(base, "/engine/generate", {"token_ids": [1, 2, 3],
                                                   "sampling": {"seed": 1, "resumed_tokens": 1_000_000}}))
    assert "resumed_tokens" in err["message"] and time.monotonic() - t0 < 5
    _is_400(_post(base, "/engine/generate", {"token_ids": [1, 2, 3], "sampling": {"seed": 1, "resumed_tokens": 3}}))
    r = _post(base, "/engine/generate", {"token_ids": [1, 2, 3], "sampling": {"seed": 1, "resumed_tokens": 2,
                                                                               "max_tokens": 1}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("app", ["engine", "frontend"])
def test_non_utf8_body_is_an_openai_400(stack, app):
    """FastAPI answered a body that is not UTF-8 with {"detail": "There was an error parsing the body"}:
    no OpenAI client reads that. Unknown paths and wrong methods get the OpenAI shape too."""
    base = getattr(stack, app).url
    _is_400(_post(base, "/v1/completions", b"u\xff\xfe\xfd"))
    r = httpx.get(f"{base}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", r.text
    r = httpx.get(f"{base}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405, r.text


def test_registry_refuses_what_would_break_the_frontend(stack):
    """{"ttl": "nan"} was taken (float("nan")) and answered with a NaN, which is not JSON: a 500. A record
    URL httpx cannot parse ("http://h:abc") killed the health poller of that record; an id with a slash
    could never be deregistered. All 400 now; a good registration still works."""
    fe = stack.frontend
    record = {"id": "fuzz-1", "url": "http://127.0.0.1:9", "model": "m", "node": "n"}
    for body in [{"record": record, "ttl": "nan"}, {"record": record, "ttl": "5"}, {"record": record, "ttl": True},
                 {"record": {**record, "url": "http://h:abc"}}, {"record": {**record, "url": "ftp://h"}},
                 {"record": {**record, "url": "http://"}}, {"record": {**record, "id": "a/b"}},
                 {"record": {**record, "id": ""}}, {"record": {**record, "pid": "1"}}, [], "x", {}]:
        _is_400(_post(fe.url, "/registry/engines", body))
    for raw in ['{"record": %s, "ttl": NaN}', '{"record": %s, "ttl": Infinity}']:
        _is_400(_post(fe.url, "/registry/engines", raw % json.dumps(record)))
    r = _post(fe.url, "/registry/engines", {"record": record, "ttl": 1})
    assert r.status_code == 200 and r.json() == {"id": "fuzz-1", "ttl": 1.0}, r.text
    assert fe.http.delete("/registry/engines/fuzz-1").status_code == 200
    assert fe.http.get("/registry/engines").status_code == 200


def test_openapi_lists_the_statuses_the_apps_answer(stack):
    for app in ("engine", "frontend"):
        schema = httpx.get(f"{getattr(stack, app).url}/openapi.json").json()
        for path, ops in schema["paths"].items():
            for method, op in ops.items():
                assert "422" not in op["responses"], (app, method, path)  # a bad field is a 400
                if "requestBody" in op:
                    assert {"400", "413"} <= set(op["responses"]), (app, method, path)
    fe = httpx.get(f"{stack.frontend.url}/openapi.json").json()["paths"]
    assert "requestBody" in fe["/admin/thresholds"]["post"] and "requestBody" in fe["/registry/engines"]["post"]


# -- slow and abusive clients ----------------------------------------------------------------------

def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(65536) == b""
    except socket.timeout:
        return False
    except OSError:  # reset
        return True


@pytest.mark.parametrize("app", ["engine", "frontend"])
def test_slow_clients_do_not_stop_health(stack, app):
    """40 clients trickle header lines (slowloris) and never finish: /health still answers at once, and
    each of them is closed --header-timeout after it connected, trickling or not."""
    proc = getattr(stack, app)
    slow = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", _port(proc.url)), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    t0 = time.monotonic()
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.25):
            for s in slow:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass

    threading.Thread(target=trickle, daemon=True).start()
    try:
        for _ in range(4):
            t = time.monotonic()
            r = httpx.get(f"{proc.url}/health", timeout=5)
            assert r.status_code == 200 and time.monotonic() - t < 2, (r.status_code, time.monotonic() - t)
            time.sleep(0.2)
        closed = wait_until(lambda: all(_closed_by_server(s) for s in slow) and time.monotonic() - t0,
                            "the slow clients to be closed", HEADER_TIMEOUT + 5)
        assert HEADER_TIMEOUT - 0.5 < closed < HEADER_TIMEOUT + 5
    finally:
        stop.set()
        for s in slow:
            s.close()
    assert httpx.get(f"{proc.url}/health", timeout=5).status_code == 200


def _raw_request(url: str, head: bytes, timeout: float = 5) -> tuple[bytes, socket.socket]:
    s = socket.create_connection(("127.0.0.1", _port(url)), timeout=timeout)
    s.sendall(head)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data, s


@pytest.mark.parametrize("app", ["engine", "frontend"])
def test_oversized_header_gets_431_at_once(stack, app):
    """A request head above --max-header-bytes is answered 431 and its connection closed. (h11's own bound
    applies only to a head that arrives incomplete: one sent whole was served.)"""
    url = getattr(stack, app).url
    t0 = time.monotonic()
    answer, s = _raw_request(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (3 * MAX_HEADER_BYTES)
                             + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert time.monotonic() - t0 < 3
    s.close()
    # the same head trickled in small pieces: refused as soon as it is too long, not when it ends
    s = socket.create_connection(("127.0.0.1", _port(url)), timeout=5)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    for _ in range(2 * MAX_HEADER_BYTES // 1024):
        try:
            s.sendall(b"X-Part: " + b"b" * 1014 + b"\r\n")
        except OSError:
            break
    assert s.recv(65536).startswith(b"HTTP/1.1 431")
    s.close()
    answer, s = _raw_request(url, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES // 2)
                             + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    s.close()


@pytest.mark.parametrize("app", ["engine", "frontend"])
def test_idle_connections_are_closed(stack, app):
    """A kept-alive connection idle for --timeout-keep-alive is closed; so is one that never says anything
    (after --header-timeout)."""
    url = getattr(stack, app).url
    answer, kept = _raw_request(url, b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    silent = socket.create_connection(("127.0.0.1", _port(url)), timeout=5)
    t0 = time.monotonic()
    try:
        idle = wait_until(lambda: _closed_by_server(kept) and time.monotonic() - t0, "the idle connection to close",
                          KEEP_ALIVE + 5)
        assert idle < KEEP_ALIVE + 2
        mute = wait_until(lambda: _closed_by_server(silent) and time.monotonic() - t0,
                          "the silent connection to close", HEADER_TIMEOUT + 5)
        assert HEADER_TIMEOUT - 0.5 < mute < HEADER_TIMEOUT + 3
    finally:
        kept.close()
        silent.close()


def test_limit_concurrency_answers_503():
    """Beyond --limit-concurrency open connections and requests, the server answers 503 instead of taking
    more work; it serves again once they are gone."""
    fe = Frontend("--limit-concurrency", "3", *LIMIT_FLAGS)
    try:
        assert fe.http.get("/live").status_code == 200
        fe.http.close()  # its own connection counts too
        held = [socket.create_connection(("127.0.0.1", fe.port), timeout=5) for _ in range(3)]
        r = httpx.get(f"{fe.url}/live", timeout=5)
        assert r.status_code == 503, r.text
        for s in held:
            s.close()
        wait_until(lambda: httpx.get(f"{fe.url}/live", timeout=5).status_code == 200, "the frontend to serve", 10)
    finally:
        fe.close()


def test_limit_flags_are_checked():
    from understudy.engine.options import parse_serve_args
    from understudy.engine.serve_config import ConfigError, HTTPOptions, ServeConfig

    config = parse_serve_args(["--timeout-keep-alive", "2.5", "--header-timeout", "7", "--max-header-bytes", "32KiB",
                               "--limit-concurrency", "100"])
    assert (config.http.timeout_keep_alive, config.http.header_timeout, config.http.max_header_bytes,
            config.http.limit_concurrency) == (2.5, 7.0, 32768, 100)
    for argv in (["--header-timeout", "0"], ["--timeout-keep-alive", "nan"], ["--limit-concurrency", "0"],
                 ["--max-header-bytes", "0"]):
        with pytest.raises(SystemExit):
            parse_serve_args(argv)
    with pytest.raises(ConfigError, match="--header-timeout"):
        ServeConfig(http=HTTPOptions(header_timeout=0))
    for cmd in (["serve", "--help"], ["frontend", "--help"]):
        out = subprocess.run([sys.executable, "-m", "understudy", *cmd], capture_output=True, text=True,
                             timeout=60).stdout
        for flag in ("--timeout-keep-alive", "--header-timeout", "--max-header-bytes", "--limit-concurrency"):
            assert flag in out, (cmd, flag)
