"""The failover path, kill to first token, for a parked shadow.

"""

from __future__ import annotations

import logging
import os
import signal
import time

from understudy.logs import log

from understudy.engine.serving.bootstrap import Built

logger = logging.getLogger("understudy.engine.serving.promotion")

def park_and_promote(built: Built) -> None:
    """A shadow's life: wait on the failover lock, then take over the KV cache and serve."""
    worker = built.worker
    engine = worker.engine.engine
    log(logger, "waiting_for_failover_lock", lock=str(built.lock.path), holder=built.lock.holder())
    built.lock.acquire()  # the kernel wakes us the moment the active engine's process dies
    t0 = time.perf_counter()
    worker.lifecycle.set_unquiesced("WAKING")  # a snapshot in progress (QUIESCED) first resumes us
    try:
        kv_s = engine.kv.adopt(built.socket_path, name=f"engine-{os.getpid()}")
        restored = engine.adopt_prefix_cache()
    except Exception:
        logger.exception("promotion_failed")
        worker.lifecycle.set("DEAD")
        os.kill(os.getpid(), signal.SIGTERM)
        return
    engine.timed_steps = 3  # the first token's time after a failover, phase by phase, in the log
    worker.lifecycle.failovers += 1
    worker.lifecycle.last_switch_s = time.perf_counter() - t0
    worker.lifecycle.set("ACTIVE", switch_s=round(worker.lifecycle.last_switch_s, 4), kv_s=round(kv_s, 4),
                         restored_blocks=restored)
