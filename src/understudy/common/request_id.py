"""X-Request-Id: the id a client gave its request (or a new one), in `request.state.request_id` for the
routes and the logs, and sent back on the response."""

from __future__ import annotations

import re
import uuid

HEADER = b"x-request-id"
_GOOD = re.compile(rb"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: safe to log and to echo


class RequestIdMiddleware:
    """Pure ASGI, so streamed answers pass through untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == HEADER), None)
        rid = given if given is not None and _GOOD.match(given) else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*(h for h in message.get("headers", []) if h[0].lower() != HEADER),
                                      (HEADER, rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)
