"""The frontend's HTTP app: a skeleton over the route modules.

Here: validation errors as 400s (counted as invalid), the body limit, /live, /health, /v1/models and
/metrics. generate.py holds the OpenAI routes (/v1/completions, /v1/chat/completions); admin.py the
run-time thresholds (/admin/thresholds) and, with embedded discovery, the engines' registry
(/registry/engines); common/service_routes.py /tokenize, /detokenize and /version. service.py holds the
Frontend they all share; common/auth.py says who may call which route.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from understudy.common.api import (BodyLimit, document_validation_as_400, error_responses, invalid_request,
                                   openai_http_errors)
from understudy.common.auth import install_middleware
from understudy.common.service_routes import add_service_routes
from understudy.frontend.admin import add_admin_routes
from understudy.frontend.generate import add_generate_routes
from understudy.frontend.service import Frontend


def create_app(fe: Frontend) -> FastAPI:
    app = FastAPI(title="understudy frontend", version="0.1.0")
    app.state.frontend = fe
    metrics = fe.metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.requests.labels(request.url.path.rsplit("/", 1)[-1], "invalid").inc()
        return invalid_request(exc.errors())

    app.add_middleware(BodyLimit, worker=fe)
    install_middleware(app, fe.access, fe.cors)  # keys, request ids, CORS
    document_validation_as_400(app)
    openai_http_errors(app)

    @app.get("/live")
    async def live():
        return {"status": "alive"}

    @app.get("/health", responses={503: {"description": "Not ready (no active engine, draining, loading): "
                                                        "`reason` says why"}})
    async def health():
        active = fe.router.active()
        reason = ("draining" if fe.draining else "loading the tokenizer" if not fe.tokenizer_ready
                  else "no active engine" if not active else None)
        body = {"status": "ok" if reason is None else "unavailable", "reason": reason, "model": fe.model_name,
                "discovery": fe.discovery, "active_engines": len(active),
                "busy_engines": sum(fe.router.busy(e) for e in active), "thresholds": fe.thresholds.as_dict(),
                "engines": [e.describe(fe.router.busy(e)) for e in fe.pool]}
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get("/metrics", responses=error_responses(ok_media=("text/plain",)))
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        lens = [e.record.max_model_len for e in fe.pool if e.record.model == fe.model_name]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": fe.created,
                                            "owned_by": "understudy", "max_model_len": max(lens, default=None)}
                                           for name in fe.openai.served_model_names]}

    add_admin_routes(app, fe)
    add_generate_routes(app, fe)
    add_service_routes(app, fe.tokenizer, lambda: fe.openai, lambda: fe.max_model_len)  # /tokenize, ...
    return app
