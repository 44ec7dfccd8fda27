"""The worker's HTTP app: a skeleton over the route modules.

Here: validation errors as 400s, the body limit, /live, /health, /v1/models and /metrics (metrics.py).
generate.py holds the generation routes (/v1/completions, /v1/chat/completions, /engine/generate);
control.py the control routes (/engine/control/sleep, wake_up, quiesce, resume); common/service_routes.py
/tokenize, /detokenize and /version. Who may call which route: common/auth.py (API keys, the admin token).
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
from understudy.engine.serving.control import add_control_routes
from understudy.engine.serving.faults import liveness
from understudy.engine.serving.generate import add_generate_routes
from understudy.engine.serving.metrics import EngineMetrics
from understudy.engine.serving.worker import Worker


def create_app(worker: Worker) -> FastAPI:
    app = FastAPI(title="understudy engine", version="0.1.0")
    metrics = EngineMetrics(worker)
    app.state.worker = worker
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return invalid_request(exc.errors())

    app.add_middleware(BodyLimit, worker=worker)
    install_middleware(app, worker.access, worker.cors)  # keys, request ids, CORS
    document_validation_as_400(app)
    openai_http_errors(app)

    @app.get("/live", responses={503: {"description": "The engine thread is stuck inside one step "
                                                      "(serving/faults.py): the body says for how long"}})
    async def live():
        ok, body = liveness(worker)  # no lock: reads when the running step began
        return body if ok else JSONResponse(body, status_code=503)

    @app.get("/health", responses={503: {"description": "Not serving (DRAINING, DEAD, ...): the body says why"}})
    async def health():
        body = {"status": "ok" if worker.state in ("ACTIVE", "STANDBY", "WAKING", "SLEEPING", "QUIESCED")
                else "unavailable",
                "failovers": worker.lifecycle.failovers, "last_switch_s": worker.lifecycle.last_switch_s,
                "state": worker.state, "routable": worker.routable, "model": worker.model_name,
                "running": len(worker.engine.engine.scheduler.running),
                "waiting": len(worker.engine.engine.scheduler.waiting),
                "kv_cache_usage": round(worker.engine.engine.blocks.usage, 4),
                "kv_adopted": worker.engine.engine.kv.adopted, **worker.info}
        if worker.failure is not None:  # DEAD after a fault: why (serving/faults.py)
            body["reason"] = worker.failure
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics", responses=error_responses(ok_media=("text/plain",)))
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": worker.created,
                                            "owned_by": "understudy", "max_model_len": worker.max_model_len}
                                           for name in worker.openai.served_model_names]}

    add_generate_routes(app, worker, metrics)
    add_control_routes(app, worker)

    async def tokenizer():
        return worker.tokenizer

    add_service_routes(app, tokenizer, lambda: worker.openai,  # /tokenize, /detokenize, /version
                       lambda: worker.max_model_len)
    return app
