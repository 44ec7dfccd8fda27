"""The engine as the HTTP layer sees it: `Worker` (the engine thread, tokenizer, limits, lifecycle,
memory sessions) and `NotActive`, the refusal of a request no active engine will take."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from understudy.common.auth import CORS, Access, load_admin_token
from understudy.common.openai_options import OpenAIOptions
from understudy.common.tokenizer import Tokenizer
from understudy.engine.core.async_engine import AsyncEngine
from understudy.engine.serving.lifecycle import Lifecycle
from understudy.memory.client import MemoryClient


@dataclass
class Worker:
    """Everything the HTTP layer needs to know about the engine behind it."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    # The OpenAI routes' settings: served names (the first is the engine's model name), the context length,
    # sampling defaults, parsers.
    openai: OpenAIOptions
    default_max_tokens: int | None = None  # None: the rest of the context
    max_request_bytes: int = 4 << 20
    lifecycle: Lifecycle = field(default_factory=lambda: Lifecycle("ACTIVE"))
    standby_wait: float = 30.0  # seconds a request sent to a standby waits for it to become active
    info: dict[str, Any] = field(default_factory=dict)
    # The weights session (its read lock keeps the layout ours); /engine/control/sleep and wake_up use it.
    # The KV cache is the engine's: engine.engine.kv.
    weights: MemoryClient | None = None
    holds: list[Any] = field(default_factory=list)  # e.g. the failover lock: kept while we serve
    # Ends the process with an exit code, once in-flight responses are sent (launch.serve wires uvicorn's
    # shutdown in); None: os._exit.
    exit_process: Callable[[int], None] | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    step_timeout: float = 60.0  # --step-timeout: the watchdog's bound on one step (0: off); /live's derives from it
    failure: str | None = None  # why the engine is DEAD after a fault (/health says it); serving/faults.py sets it
    faults: Any = None  # serving/faults.FailFast once built (bootstrap.finish)
    access: Access | None = None  # the credentials the app checks (common/auth.py); None: the node's admin token
    cors: CORS = field(default_factory=CORS)

    def __post_init__(self) -> None:
        if self.access is None:
            self.access = Access(load_admin_token())

    @property
    def model_name(self) -> str:
        return self.openai.model_name

    @property
    def max_model_len(self) -> int:
        return self.openai.max_model_len

    @property
    def state(self) -> str:
        return self.lifecycle.state

    @property
    def routable(self) -> bool:
        return self.state == "ACTIVE"


class NotActive(RuntimeError):
    """The engine did not become active within the wait (a parked shadow, or draining)."""

