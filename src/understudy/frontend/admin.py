"""The frontend's operator routes: the busy thresholds, read and changed at run time (GET / POST
/admin/thresholds), and, with embedded discovery, the engines' registry (/registry/engines, from
discovery/embedded.py). Both need the admin token (common/auth.py): engines registering send it."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request

from understudy.common.api import error, error_responses
from understudy.discovery.embedded import EmbeddedRegistry
from understudy.frontend.service import Frontend
from understudy.logs import log

logger = logging.getLogger("understudy.frontend")


# The body of POST /admin/thresholds (read by hand: Thresholds.update validates it), for /openapi.json.
THRESHOLDS_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": False,
    "properties": {"kv_usage": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                   "waiting": {"type": "integer", "minimum": 1}}}}}}}


def add_admin_routes(app: FastAPI, fe: Frontend) -> None:
    if isinstance(fe.view, EmbeddedRegistry):
        app.include_router(fe.view.routes())

    @app.get("/admin/thresholds")
    async def get_thresholds():
        return fe.thresholds.as_dict()

    @app.post("/admin/thresholds", responses=error_responses(400, 413), openapi_extra=THRESHOLDS_BODY)
    async def set_thresholds(request: Request):
        """Change the busy thresholds: {"kv_usage": 0.9, "waiting": 8} (either or both)."""
        try:
            changes = json.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            old = fe.thresholds.as_dict()
            fe.thresholds.update(changes)
        except ValueError as e:
            return error(400, str(e))
        log(logger, "thresholds_changed", old=old, new=fe.thresholds.as_dict())
        return fe.thresholds.as_dict()
