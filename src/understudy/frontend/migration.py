"""One request's tokens, from whichever engine can give them.

The frontend sends token ids to an engine (`POST /engine/generate`) and reads one NDJSON line per
step. When the stream breaks (the engine died, the connection dropped, no first token for
--stream-timeout, no next token for --stall-timeout: a hung engine, which is then suspect)
the request is resent to another engine as prompt + the tokens generated so far, with max_tokens
reduced by what was generated, every other sampling field as it was, and `resumed_tokens` saying how many
of the prompt's tokens are its own output (the seeded sampler draws by output position; penalties, min_tokens
and the grammar count them as output), so greedy and seeded answers continue exactly as if nothing happened:
the client sees no lost and no duplicated token, and no logprob twice. Each choice of an n > 1 request is a
Generation of its own and migrates on its own. The engine of the same node comes first (a promoted shadow finds
the prefix in the KV cache it adopted). Before any engine accepted the request, an unreachable or
refusing (503) engine is simply replaced by another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

import httpx

from understudy.common.api import TokenSampling, logprobs_from_wire
from understudy.common.params import SamplingParams, TokenLogprob
from understudy.logs import log
from understudy.frontend.metrics import FrontendMetrics
from understudy.frontend.pool import EngineState
from understudy.frontend.router import AllBusy, NoEngine, Router

logger = logging.getLogger("understudy.frontend.migration")


@dataclass
class Policy:
    limit: int = 3  # migrations per request (0: none)
    max_seq_len: int | None = None  # prompt + generated above this: not migrated
    stream_timeout: float = 120.0  # seconds to the first token of an engine: broken (stalled) after that
    stall_timeout: float = 10.0  # seconds between two tokens of an engine: stalled after that (0: stream_timeout)


@dataclass
class Chunk:
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, on the first chunk, when asked


class EngineRefused(Exception):
    """The engine rejected the request itself (4xx): its answer goes to the client as it is."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}")
        self.status, self.body = status, body


class StreamFailed(Exception):
    """The request broke and could not continue elsewhere (migration off, limit, length, no engine)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class EngineError(Exception):
    """The engine failed the request inside a step (finish_reason "error")."""


class _Broken(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class _Expired(Exception):
    """_within's time ran out."""


async def _within(awaitable, seconds: float):
    """`await awaitable`, or _Expired after `seconds`: asyncio.timeout's way (cancel this task at the
    deadline, turn that cancellation into an exception), with no task per call and on Python 3.10 too."""
    task = asyncio.current_task()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    handle = asyncio.get_running_loop().call_later(max(0.0, seconds), expire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not expired or (hasattr(task, "cancelling") and task.cancelling() > 1):
            raise  # cancelled from outside (the client went away) as well
        if hasattr(task, "uncancel"):
            task.uncancel()
        raise _Expired() from None
    finally:
        handle.cancel()


class Generation:
    def __init__(self, http: httpx.AsyncClient, router: Router, metrics: FrontendMetrics, policy: Policy,
                 prompt: list[int], params: SamplingParams, request_id: str):
        self.http, self.router, self.metrics, self.policy = http, router, metrics, policy
        self.prompt, self.params, self.request_id = prompt, params, request_id
        self.generated: list[int] = []
        self.migrations = 0
        self.cached_tokens: int | None = None  # what the first engine found of the prompt in its cache
        self.engines: list[str] = []  # ids of the engines that served it, in order
        self.got_prompt_logprobs = False

    def _body(self) -> dict[str, Any]:
        """Every sampling field; on a resend the tokens so far are resumed output (penalties, min_tokens, the
        grammar and the seeded sampler count them), and the prompt's logprobs, already sent, are not asked again."""
        n, max_tokens = len(self.generated), self.params.max_tokens
        params = replace(self.params, max_tokens=None if max_tokens is None else max_tokens - n, resumed_tokens=n,
                         prompt_logprobs=None if self.got_prompt_logprobs else self.params.prompt_logprobs)
        return {"token_ids": self.prompt + self.generated, "request_id": self.request_id,
                "sampling": TokenSampling.of(params)}

    async def stream(self) -> AsyncIterator[Chunk]:
        """Chunks until one has a finish_reason. Raises NoEngine / AllBusy (nothing accepted it),
        EngineRefused, EngineError or StreamFailed."""
        exclude: set[str] = set()
        accepted = False  # an engine answered 200: from here on a failure is a migration
        engine = self.router.pick()
        while True:
            if (self.generated and self.params.max_tokens is not None
                    and len(self.generated) >= self.params.max_tokens):  # broke right after the last token
                yield Chunk([], "length", len(self.prompt), self.cached_tokens or 0)
                return
            try:
                # aclosing: when our caller stops early (stop string, client gone), the engine's
                # stream is closed now, which cancels the request there and frees its KV.
                async with aclosing(self._from(engine)) as chunks:
                    async for chunk in chunks:
                        accepted = True
                        yield chunk
                        if chunk.finish_reason:
                            return
                raise _Broken("stream_broken", "the engine closed the stream before the end")
            except _Broken as broken:
                exclude.add(engine.id)
                if broken.reason == "refused":
                    engine.poke.set()  # re-read its state: it may be busy or not active
                elif broken.reason == "stalled":
                    engine.stalled(str(broken))  # it answers (maybe) but makes no progress: no new work
                else:
                    engine.unreachable()
                if not accepted:
                    # No token came, so none can be lost or repeated: another engine just takes it (each
                    # engine once), whether or not migration is on.
                    engine = self._retry(engine, broken, exclude)
                    continue
                engine = self._migrate(engine, broken, exclude)

    def _retry(self, failed: EngineState, broken: _Broken, exclude: set[str]) -> EngineState:
        self.metrics.retries.inc()
        log(logger, "retry", request_id=self.request_id, engine=failed.id, reason=broken.reason, error=str(broken))
        try:
            return self.router.pick(exclude)
        except (NoEngine, AllBusy):
            if broken.reason == "refused":
                raise AllBusy("every engine refused the request (overloaded or not active)") from None
        # The engine died before answering: its node's shadow (held until promoted) or a busy engine.
        return self.router.pick_for_migration(failed.node, exclude, hung=broken.reason == "stalled")

    def _migrate(self, failed: EngineState, broken: _Broken, exclude: set[str]) -> EngineState:
        seq_len = len(self.prompt) + len(self.generated)
        refusal = None
        if self.policy.limit <= 0:
            refusal = "disabled"
        elif self.migrations >= self.policy.limit:
            refusal = "limit"
        elif self.policy.max_seq_len is not None and seq_len > self.policy.max_seq_len:
            refusal = "max_seq_len"
        target = None
        if refusal is None:
            try:
                target = self.router.pick_for_migration(failed.node, exclude, hung=broken.reason == "stalled")
            except NoEngine:
                refusal = "no_engine"
        if refusal is not None:
            self.metrics.migration_failures.labels(refusal).inc()
            log(logger, "migration_refused", logging.WARNING, request_id=self.request_id, engine=failed.id,
                reason=refusal, error=str(broken), generated=len(self.generated), migrations=self.migrations)
            raise StreamFailed(f"the engine serving this request failed ({broken}) after {len(self.generated)} "
                               f"tokens and the request could not move to another engine ({refusal})", refusal)
        self.migrations += 1
        self.metrics.migrations.labels(broken.reason).inc()
        self.metrics.migrated_tokens.inc(seq_len)
        log(logger, "migrating", request_id=self.request_id, source=failed.id, target=target.id,
            target_state=target.state, same_node=target.node == failed.node, reason=broken.reason,
            error=str(broken), generated=len(self.generated), migration=self.migrations)
        return target

    async def _from(self, engine: EngineState) -> AsyncIterator[Chunk]:
        """One engine's part of the answer. Failures become _Broken (or EngineRefused / EngineError)."""
        self.engines.append(engine.id)
        engine.inflight += 1
        # The headers within --stream-timeout (httpx); the lines within _within's bounds (below), so a
        # stall is told from a dropped connection.
        timeout = httpx.Timeout(self.policy.stream_timeout + 1.0, connect=5.0)
        first, stall = self.policy.stream_timeout, self.policy.stall_timeout or self.policy.stream_timeout
        last, tokens = time.monotonic(), 0  # when this engine last sent a token; how many it sent
        try:
            async with self.http.stream("POST", f"{engine.url}/engine/generate", json=self._body(),
                                        timeout=timeout) as r:
                if r.status_code == 503:
                    detail = f"HTTP 503: {(await r.aread())[:300]!r}"
                    if r.headers.get("x-understudy-failure"):  # the engine failed (engine/serving/faults.py):
                        raise _Broken("engine_failed", detail)  # gone like a dead one, not busy
                    raise _Broken("refused", detail)
                if 400 <= r.status_code < 500:
                    raw = await r.aread()
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = {"error": {"message": raw.decode(errors="replace"), "type": "invalid_request_error",
                                          "param": None, "code": r.status_code}}
                    raise EngineRefused(r.status_code, body)
                if r.status_code != 200:
                    raise _Broken("stream_broken", f"HTTP {r.status_code}")
                lines = r.aiter_lines()
                while True:
                    bound = stall if tokens else first
                    try:
                        line = await _within(lines.__anext__(), last + bound - time.monotonic())
                    except StopAsyncIteration:
                        break
                    except _Expired:
                        self.metrics.stalls.inc()
                        log(logger, "stream_stalled", logging.WARNING, request_id=self.request_id, engine=engine.id,
                            seconds=bound, tokens_from_engine=tokens, generated=len(self.generated))
                        raise _Broken("stalled", f"no token from the engine for {bound:g} s (after {tokens} "
                                                 f"from it)") from None
                    if not line.strip():
                        continue
                    out = json.loads(line)
                    if out.get("error"):
                        raise EngineError(out["error"])
                    ids = out.get("token_ids") or []
                    if ids or out.get("finish_reason"):
                        last, tokens = time.monotonic(), tokens + len(ids)
                        if engine.suspect is not None:
                            engine.progressed("token")
                    self.generated += ids
                    if self.cached_tokens is None:
                        self.cached_tokens = int(out.get("cached_tokens") or 0)
                    prompt_logprobs = logprobs_from_wire(out.get("prompt_logprobs"))
                    self.got_prompt_logprobs = self.got_prompt_logprobs or prompt_logprobs is not None
                    yield Chunk(ids, out.get("finish_reason"), len(self.prompt), self.cached_tokens,
                                logprobs_from_wire(out.get("logprobs")), prompt_logprobs)
        except httpx.ConnectError as e:
            raise _Broken("unreachable", f"{type(e).__name__}: {e}") from None
        except (httpx.TransportError, ValueError) as e:  # dropped, reset, timed out; a torn line
            raise _Broken("stream_broken", f"{type(e).__name__}: {e}") from None
        finally:
            engine.inflight -= 1
            engine.last_used = time.monotonic()
