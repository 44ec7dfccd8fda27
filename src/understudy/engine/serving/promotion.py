"""The failover path, from the active engine's death to the promoted shadow's first token.

Read top to bottom; each step names the function that does it.

Before: a shadow imported the weights read-only (model/weights.load), reserved its KV range at the
active engine's KV shape and warmed up / captured graphs on a scratch chunk (core/kv_cache.KVCache.scratch),
then dropped the scratch mapping (KVCache.park, via serving/bootstrap.finish) and called
`park_and_promote` below on its own thread (engine/launch.py).

 1. kill. The active engine dies, however it dies. Its failover lock's fd and memory sessions were
    lifted above its driver files (fds.lift), so the kernel closes them first.
 2. flock. The kernel hands the lock to the waiting shadow: `FailoverLock.acquire` returns
    (failover/lock.py). State WAKING (`Lifecycle.set_unquiesced`: a snapshot in progress resumes first).
 3. adopt the pools. `KVCache.adopt` takes the device's kv pool (free the moment its owner died) and
    maps its one allocation into the reserved range: no allocation, no copy; captured CUDA graphs stay
    valid because the addresses did not change. A tensor-parallel leader does this on every rank at
    once (parallel/group.GroupKVCache.adopt). The weights were never unmapped.
 4. rebuild the prefix cache. `LLMEngine.adopt_prefix_cache` reads the sealed-block index the dead
    engine kept behind its K/V bytes (KVCache.read_index) and registers those blocks as cached
    prefixes (core/block_manager.BlockManager.restore).
 5. ACTIVE. `Lifecycle.set("ACTIVE")`: held requests are released, /health says routable, discovery
    records follow (serving/announce.py).
 6. first token. Clients' broken streams are resent by the frontend with prompt + tokens so far
    (frontend/migration.Generation.stream); they hit the adopted prefixes, so the first step is a
    short prefill (`engine.timed_steps` logs its phases).
 7. relaunch. `understudy up` starts a replacement on the dead engine's port, which parks as the new
    shadow (node/supervisor.Supervisor.run).

A promotion that fails (the pool cannot be adopted) marks the engine DEAD and ends it with SIGTERM, so
the next shadow in line gets the lock. A shadow that gets the lock of a device marked faulty (the active
engine died of a device fault, failover/faults.py) does not wake: DEAD ("device fault"), exit 7
(serving/faults.FailFast.device_faulted); so does every shadow after it.

The active engine need not die of a kill: a step that raises or hangs (serving/faults.py) releases the lock
and the kv pool itself and exits within a second; from step 2 on the path is the same.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from understudy.engine.serving.bootstrap import Built
from understudy.failover.faults import read_marker
from understudy.logs import log

logger = logging.getLogger("understudy.engine.serving.promotion")


def park_and_promote(built: Built) -> None:
    """A shadow's life: wait on the failover lock, then take over the KV cache and serve."""
    worker = built.worker
    engine = worker.engine.engine
    log(logger, "waiting_for_failover_lock", lock=str(built.lock.path), holder=built.lock.holder())
    built.lock.acquire()  # the kernel wakes us the moment the active engine's process dies
    t0 = time.perf_counter()
    if (marker := read_marker(built.lock.path)) is not None:  # it died of a device fault: we cannot help
        log(logger, "device_faulty", logging.ERROR, **marker)
        worker.faults.device_faulted(marker)  # DEAD, lock released, exit DEVICE_FAULT
        return
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
