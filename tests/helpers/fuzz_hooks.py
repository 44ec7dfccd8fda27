"""schemathesis hooks for tests/test_http_fuzz.py (loaded by `schemathesis run` through SCHEMATHESIS_HOOKS).

before_call keeps a case quick on a CPU without turning invalid data valid or the reverse; after_call puts
back what a case of a state-changing route changed, so the server under test serves the next case as it
served the first. What they need comes in the environment (UNDERSTUDY_FUZZ_*).
"""

from __future__ import annotations

import os
from urllib.parse import quote

import httpx
import schemathesis

from understudy.common.auth import admin_headers

MODEL = os.environ.get("UNDERSTUDY_FUZZ_MODEL", "")
MAX_TOKENS = int(os.environ.get("UNDERSTUDY_FUZZ_MAX_TOKENS", "4"))
MAX_MODEL_LEN = int(os.environ.get("UNDERSTUDY_FUZZ_MAX_MODEL_LEN", "512"))
BASE = os.environ.get("UNDERSTUDY_FUZZ_BASE", "")
KEEP_ENGINE = os.environ.get("UNDERSTUDY_FUZZ_KEEP_ENGINE", "")  # the real engine's registration
THRESHOLDS = {"kv_usage": 0.95, "waiting": 32}  # the frontend's flags' defaults
WAIT_S = 1.0  # the most a case may ask a route to wait (resume's `timeout`)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@schemathesis.hook
def before_call(context, case, kwargs):
    """A max_tokens the engine would generate in full becomes 1..MAX_TOKENS (larger ones stay: they must get
    400); a model name mostly becomes the served one (else nearly every case would stop at 404); resume's
    wait is bounded to WAIT_S."""
    body = case.body
    if not isinstance(body, dict):
        return
    holders = [body] + [body[k] for k in ("sampling",) if isinstance(body.get(k), dict)]
    for holder in holders:
        for key in ("max_tokens", "max_completion_tokens"):
            v = holder.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and MAX_TOKENS < v <= MAX_MODEL_LEN:
                holder[key] = 1 + v % MAX_TOKENS
    if isinstance(body.get("model"), str) and len(body["model"]) % 4:
        body["model"] = MODEL
    if case.path == "/engine/control/resume" and _number(body.get("timeout")) and body["timeout"] > WAIT_S:
        body["timeout"] = WAIT_S


@schemathesis.hook
def after_call(context, case, response):
    if case.path.startswith("/engine/control/"):
        _engine_active()
    elif case.path.startswith(("/admin/", "/registry/")) and case.method.upper() != "GET":
        _frontend_as_before()


def _engine_active() -> None:
    """A sleeping engine is woken, a quiesced one resumed: the next case finds it ACTIVE."""
    with httpx.Client(base_url=BASE, timeout=30, headers=admin_headers()) as http:
        state = http.get("/health").json()["state"]
        if state == "SLEEPING":
            r = http.post("/engine/control/wake_up")
        elif state == "QUIESCED":
            r = http.post("/engine/control/resume")
        else:
            return
        assert r.status_code == 200, r.text
        assert http.get("/health").json()["state"] == "ACTIVE"


def _frontend_as_before() -> None:
    """The thresholds back to the flags' values; every fuzzed registration gone (the real engine's stays:
    its id cannot be guessed)."""
    with httpx.Client(base_url=BASE, timeout=30, headers=admin_headers()) as http:
        assert http.post("/admin/thresholds", json=THRESHOLDS).status_code == 200
        for lease in http.get("/registry/engines").json()["engines"]:
            if lease["record"]["id"] != KEEP_ENGINE:
                http.delete(f"/registry/engines/{quote(lease['record']['id'], safe='')}")
