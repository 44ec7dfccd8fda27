"""Requests to an engine's token endpoint, as the failover tests make them (TP=1 and TP groups alike)."""

from __future__ import annotations

import json
import threading
from typing import Callable

import httpx

from understudy.common.auth import admin_headers


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


def streams_across(url: str, prompts: dict[int, list[int]], max_tokens: int, event: Callable[[], object], *,
                   started: int = 2, resend_to: str | None = None,
                   context: Callable[[], object] = lambda: None) -> tuple[dict[int, list[int]], dict[int, dict]]:
    """Stream every prompt from `url`; once each stream has `started` tokens (and none has ended), run
    `event` (a kill). Returns (each stream's tokens from `url`, what was resent).

    With `resend_to`, a stream that breaks is resent there as a client would retry it: the prompt and
    the tokens so far, for the rest of max_tokens; resent[i] holds that answer's tokens, cached and prompt
    tokens and the resent length. Without it, every stream must end normally. Any error fails the test,
    with `context()` (e.g. a log tail) in the message."""
    got: dict[int, list[int]] = {i: [] for i in prompts}
    resent: dict[int, dict] = {}
    errors: list[BaseException] = []
    ready = threading.Semaphore(0)
    go = threading.Barrier(len(prompts))  # the requests go out together: none runs ahead of the others

    def stream(i: int) -> None:
        signalled = False
        try:
            with httpx.Client(timeout=120, headers=admin_headers()) as http:
                go.wait(timeout=60)
                try:
                    with http.stream("POST", f"{url}/engine/generate", json=body(prompts[i], max_tokens)) as r:
                        assert r.status_code == 200, r.read()
                        for line in r.iter_lines():
                            if not line:
                                continue
                            out = json.loads(line)
                            assert out["error"] is None, out
                            got[i] += out["token_ids"]
                            if len(got[i]) >= started and not signalled:
                                signalled = True
                                ready.release()
                            if out["finish_reason"]:
                                assert out["finish_reason"] == "length", out
                                return
                    raise AssertionError(f"stream {i} ended without a finish_reason")
                except httpx.TransportError:
                    if resend_to is None:
                        raise
                resend = prompts[i] + got[i]
                lines = ndjson(http.post(f"{resend_to}/engine/generate",
                                         json=body(resend, max_tokens - len(got[i]))))
                resent[i] = {"tokens": tokens_of(lines), "cached": lines[-1]["cached_tokens"],
                             "prompt_tokens": lines[-1]["prompt_tokens"], "len": len(resend)}
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
        finally:
            if not signalled:
                ready.release()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in prompts]
    for t in threads:
        t.start()
    for _ in prompts:
        assert ready.acquire(timeout=180), "the streams did not all start"
    assert not errors, (errors, context())
    assert all(len(g) < max_tokens for g in got.values()), {i: len(g) for i, g in got.items()}
    event()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads)
    assert not errors, (errors, context())
    return got, resent


class Streams:
    """OpenAI streams, each on its own thread, collecting its chunks' text and finish reason.

        streams = Streams([lambda: create(client, model, p, stream=True) for p in prompts], few=3)
        ...                            # every stream has `few` chunks (or ended) here: do the fault
        streams.join()                 # then got / finish / errors hold what each stream saw
    """

    def __init__(self, starts: list[Callable[[], object]], few: int, timeout: float = 120.0):
        self.got: list[list[str]] = [[] for _ in starts]
        self.finish: list[str | None] = [None] * len(starts)
        self.errors: list[BaseException] = []
        started = threading.Semaphore(0)

        def stream(i: int) -> None:
            signalled = False
            try:
                for c in starts[i]():
                    self.got[i].append(c.choices[0].text)
                    self.finish[i] = c.choices[0].finish_reason
                    if len(self.got[i]) >= few and not signalled:
                        signalled = True
                        started.release()
            except BaseException as e:  # noqa: BLE001 - reported by the test thread
                self.errors.append(e)
            finally:
                if not signalled:
                    started.release()

        self.threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(len(starts))]
        for t in self.threads:
            t.start()
        for _ in self.threads:
            assert started.acquire(timeout=timeout), "the streams did not start"
        assert not self.errors, self.errors

    def join(self, timeout: float = 180.0) -> None:
        for t in self.threads:
            t.join(timeout=timeout)
        assert not any(t.is_alive() for t in self.threads) and not self.errors, self.errors
