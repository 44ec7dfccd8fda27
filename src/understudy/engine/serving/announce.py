"""What `understudy serve --register` publishes: this engine's discovery record, kept current."""

from __future__ import annotations

import os
import socket
import time

from understudy.discovery.records import EngineRecord
from understudy.discovery.registration import Registration, advertised_url
from understudy.engine.serve_config import ServeConfig


def registrations(config: ServeConfig, worker, lock_path: str) -> list[Registration]:
    """One Registration per --register target; their records follow the worker's lifecycle."""
    discovery, http = config.discovery, config.http
    if not discovery.register:
        return []
    host = socket.gethostname()
    ident = {"id": f"{host}-{http.port}-{os.getpid()}",
             "url": advertised_url(http.host, http.port, discovery.advertise_url),
             "node": f"{host}:{lock_path}", "role": config.failover.role, "pid": os.getpid(),
             "registered_at": time.time()}

    def record() -> EngineRecord:
        return EngineRecord(**ident, model=worker.model_name, state=worker.state, routable=worker.routable,
                            max_model_len=worker.max_model_len)

    try:
        regs = [Registration(url, record, discovery.registration_ttl, headers=worker.access.admin_headers())
                for url in discovery.register]
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"understudy serve: --register: {e}") from None
    worker.lifecycle.on_change(lambda _state: [r.changed() for r in regs])
    return regs
