"""The registry a frontend holds in memory (the default discovery): engines register over HTTP.

    POST   /registry/engines                 {"record": {...}, "ttl": 2.0}  register or update
    PUT    /registry/engines/{id}/keepalive  renew the lease (404: unknown or expired: register again)
    DELETE /registry/engines/{id}            deregister
    GET    /registry/engines                 the records, with the seconds left on their leases

A record whose keep-alives stop expires after its TTL (a timer per record, no sweeping).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import httpx
import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from understudy.discovery.records import EngineRecord, View

MIN_TTL = 0.5

# POST /registry/engines's body, for /openapi.json (parse_registration checks it).
_STR = {"type": "string"}
REGISTRATION_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["record"],
    "properties": {
        "record": {"type": "object", "required": ["id", "url", "model", "node"],
                   "properties": {"id": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}, "url": _STR,
                                  "model": _STR, "node": _STR, "role": _STR, "state": _STR,
                                  "routable": {"type": "boolean"},
                                  "max_model_len": {"type": "integer"}, "pid": {"type": "integer"},
                                  "registered_at": {"type": "number"}, "ttl": {"type": "number"}}},
        "ttl": {"type": "number"}}}}}}}
_ERROR = {"application/json": {"schema": {"type": "object", "required": ["error"]}}}


def parse_registration(raw: bytes) -> tuple[EngineRecord, float]:
    """The record and TTL of a registration body; ValueError saying what is wrong.

    BUGFIX (tests/test_http_fuzz.py::test_registry_refuses_what_would_break_the_frontend): `"ttl": "nan"`
    was taken (float("nan"); a string, or true, passed for a number too) and answered with a NaN, which is
    not JSON: a 500. A record URL httpx cannot parse ("http://h:abc") raised httpx.InvalidURL, which is
    no HTTPError, in that record's health poller and ended it; an id with a "/" could never be
    deregistered. All are 400s now. (msgspec's JSON reader refuses NaN and Infinity literals itself.)"""
    try:
        body = msgspec.json.decode(raw)
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        record = msgspec.convert(body["record"], EngineRecord)
    except KeyError as e:
        raise ValueError(f"missing {e}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(str(e)) from None
    ttl = body.get("ttl", 10.0)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise ValueError(f"ttl must be a finite number of seconds, got {ttl!r}")
    if not record.id or "/" in record.id:  # an id with a slash could never be deregistered (DELETE .../{id})
        raise ValueError(f"record.id must be a non-empty string without '/', got {record.id!r}")
    try:
        url = httpx.URL(record.url)
    except (httpx.InvalidURL, TypeError, ValueError) as e:
        raise ValueError(f"record.url is not a URL: {e}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"record.url must be an http(s) URL, got {record.url!r}")
    return record, float(ttl)


class EmbeddedRegistry(View):
    def __init__(self, max_ttl: float = 300.0):
        super().__init__()
        self.max_ttl = max_ttl
        self._leases: dict[str, tuple[float, float, asyncio.TimerHandle]] = {}  # id -> (ttl, deadline, timer)

    def register(self, record: EngineRecord, ttl: float) -> float:
        """Put the record with a lease of `ttl` seconds (clamped); returns the TTL granted."""
        ttl = min(max(float(ttl), MIN_TTL), self.max_ttl)
        self._arm(record.id, ttl)
        self._put(record)
        return ttl

    def keepalive(self, engine_id: str) -> bool:
        lease = self._leases.get(engine_id)
        if lease is None:
            return False
        self._arm(engine_id, lease[0])
        return True

    def deregister(self, engine_id: str, reason: str = "deregistered") -> bool:
        lease = self._leases.pop(engine_id, None)
        if lease is None:
            return False
        lease[2].cancel()
        self._delete(engine_id, reason)
        return True

    def leases(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"record": msgspec.to_builtins(self.records[i]), "ttl": ttl, "expires_in": round(deadline - now, 3)}
                for i, (ttl, deadline, _) in self._leases.items()]

    async def stop(self) -> None:
        for _, _, timer in self._leases.values():
            timer.cancel()

    def _arm(self, engine_id: str, ttl: float) -> None:
        old = self._leases.get(engine_id)
        if old is not None:
            old[2].cancel()
        timer = asyncio.get_running_loop().call_later(ttl, self._expire, engine_id)
        self._leases[engine_id] = (ttl, time.monotonic() + ttl, timer)

    def _expire(self, engine_id: str) -> None:
        if self._leases.pop(engine_id, None) is not None:
            self._delete(engine_id, "lease_expired")

    def routes(self) -> APIRouter:
        router = APIRouter(prefix="/registry")

        def _bad(message: str, status: int = 400) -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                           "code": status}}, status_code=status)

        @router.post("/engines", openapi_extra=REGISTRATION_BODY,
                     responses={400: {"description": "Invalid registration", "content": _ERROR},
                                413: {"description": "Body above --max-request-bytes", "content": _ERROR}})
        async def register(request: Request):
            try:
                record, ttl = parse_registration(await request.body())
            except ValueError as e:
                return _bad(f"invalid registration: {e}")
            return {"id": record.id, "ttl": self.register(record, ttl)}

        @router.put("/engines/{engine_id}/keepalive",
                    responses={404: {"description": "No lease: register again", "content": _ERROR}})
        async def keepalive(engine_id: str):
            if not self.keepalive(engine_id):
                return _bad(f"no lease for engine {engine_id!r} (expired or never registered)", 404)
            return {"id": engine_id, "ttl": self._leases[engine_id][0]}

        @router.delete("/engines/{engine_id}", responses={404: {"description": "No such engine", "content": _ERROR}})
        async def deregister(engine_id: str):
            if not self.deregister(engine_id):
                return _bad(f"no engine {engine_id!r}", 404)
            return {"id": engine_id, "deregistered": True}

        @router.get("/engines")
        async def listing():
            return {"engines": self.leases()}

        return router
