"""Requests to an engine's token endpoint, as the failover tests make them (TP=1 and TP groups alike)."""

from __future__ import annotations

import json
import threading
from typing import Callable

import httpx


def event_of(line: str) -> dict:
    """A JSON log line as a dict ({} for anything else)."""
    try:
        e = json.loads(line)
    except ValueError:
        return {}
    return e if isinstance(e, dict) else {}


def body(token_ids: list[int], max_tokens: int) -> dict:
    """/engine/generate's body for a greedy request that runs to max_tokens."""
    return {"token_ids": token_ids, "sampling": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}


def ndjson(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    return [json.loads(l) for l in r.text.splitlines() if l]


def tokens_of(lines: list[dict]) -> list[int]:
    assert lines[-1]["finish_reason"] == "length" and all(l["error"] is None for l in lines), lines
    return [t for l in lines for t in l["token_ids"]]


def streams_across(url: str, prompts: dict[int, list[int]], max_tokens: int,
                   event: Callable[[], None]) -> dict[int, list[int]]:
    """Stream every prompt from `url`; once each stream has 2 tokens (and none has ended), run `event`
    (a kill); return each stream's tokens, which must all have arrived without an error."""
    got: dict[int, list[int]] = {i: [] for i in prompts}
    errors: list[BaseException] = []
    ready = threading.Semaphore(0)
    go = threading.Barrier(len(prompts))  # the requests go out together: none runs ahead of the others

    def stream(i: int) -> None:
        signalled = False
        try:
            with httpx.Client(timeout=120) as http:
                go.wait(timeout=60)
                with http.stream("POST", f"{url}/engine/generate", json=body(prompts[i], max_tokens)) as r:
                    assert r.status_code == 200, r.read()
                    for line in r.iter_lines():
                        if line:
                            out = json.loads(line)
                            assert out["error"] is None, out
                            got[i] += out["token_ids"]
                            if len(got[i]) >= 2 and not signalled:
                                signalled = True
                                ready.release()
                            if out["finish_reason"]:
                                assert out["finish_reason"] == "length", out
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
        finally:
            if not signalled:
                ready.release()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in prompts]
    for t in threads:
        t.start()
    for _ in prompts:
        assert ready.acquire(timeout=120), "the streams did not all start"
    assert not errors, errors
    assert all(len(g) < max_tokens for g in got.values()), got
    event()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    return got
