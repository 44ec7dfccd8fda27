"""The frontend's state: what the HTTP routes need (engine pool, router, metrics, HTTP client to the
engines, tokenizer, thresholds, migration policy), started and stopped by launch.py around the server."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from understudy.common.auth import CORS, Access, load_admin_token
from understudy.common.openai_options import OpenAIOptions
from understudy.common.tokenizer import Tokenizer
from understudy.discovery.records import View
from understudy.frontend.health import HealthMonitor
from understudy.frontend.metrics import FrontendMetrics
from understudy.frontend.migration import Policy
from understudy.frontend.pool import Pool
from understudy.frontend.router import Router, Thresholds


@dataclass
class Frontend:
    """Everything the HTTP layer needs."""

    model_name: str
    view: View
    discovery: str  # "embedded" or the etcd URL (for /health)
    policy: Policy = field(default_factory=Policy)
    thresholds: Thresholds = field(default_factory=Thresholds)
    default_max_tokens: int | None = None  # None: the rest of the context
    max_request_bytes: int = 4 << 20
    retry_after: int = 1
    health_interval: float = 1.0
    health_timeout: float = 5.0
    canary_interval: float = 0.0
    canary_timeout: float = 10.0
    load_tokenizer: Callable[[], Tokenizer] | None = None  # run on a thread at start-up
    draining: bool = False
    inflight: set[str] = field(default_factory=set)  # ids of the requests being answered
    created: int = field(default_factory=lambda: int(time.time()))
    # The OpenAI routes' settings (served names, generation_config.json's sampling defaults, parsers);
    # None: model_name alone.
    openai: OpenAIOptions | None = None
    # The credentials our routes check (common/auth.py); None: the node's admin token, no API keys. The
    # admin token also goes to the engines (/engine/generate needs it).
    access: Access | None = None
    cors: CORS = field(default_factory=CORS)

    def __post_init__(self) -> None:
        if self.openai is None:
            self.openai = OpenAIOptions(served_model_names=(self.model_name,))
        if self.access is None:
            self.access = Access(load_admin_token())
        self.metrics = FrontendMetrics()
        self.pool = Pool(self.view)
        self.router = Router(self.pool, self.thresholds, self.model_name)
        self.metrics.watch_engines(self.router)
        self.tokenizer_task: asyncio.Future | None = None
        self.http: httpx.AsyncClient | None = None
        self.monitor: HealthMonitor | None = None

    async def start(self) -> None:
        # No pool limit: every streamed request holds a connection to its engine for its whole life.
        self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                                      timeout=httpx.Timeout(30.0, connect=5.0),
                                      headers=self.access.admin_headers())
        self.monitor = HealthMonitor(self.pool, self.http, self.metrics, interval=self.health_interval,
                                     timeout=self.health_timeout, canary_interval=self.canary_interval,
                                     canary_timeout=self.canary_timeout)
        if self.load_tokenizer is not None:
            self.tokenizer_task = asyncio.ensure_future(asyncio.to_thread(self.load_tokenizer))
        self.pool.start()
        await self.view.start()

    async def stop(self) -> None:
        await self.view.stop()
        if self.monitor is not None:
            await self.monitor.stop()
        if self.http is not None:
            await self.http.aclose()

    async def tokenizer(self) -> Tokenizer:
        return await asyncio.shield(self.tokenizer_task)

    @property
    def max_model_len(self) -> int | None:
        """The context length requests are sized by: --max-model-len, else the smallest of the engines serving
        the model (None while none is known)."""
        if self.openai.max_model_len:
            return self.openai.max_model_len
        lens = [e.record.max_model_len for e in self.pool if e.record.model == self.model_name
                and e.record.max_model_len]
        return min(lens, default=None)

    @property
    def tokenizer_ready(self) -> bool:
        t = self.tokenizer_task
        return t is not None and t.done() and not t.cancelled() and t.exception() is None
