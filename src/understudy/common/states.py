"""An engine's lifecycle states, by name: the engine moves through them (engine/serving/lifecycle.py) and
reports them (/health, /metrics, its discovery record); the frontend counts its engines by them.

    INIT -> STANDBY (parked shadow) -> WAKING -> ACTIVE -> DRAINING / DEAD

INIT      not started yet (a Lifecycle's first state); nothing is admitted
STANDBY   a parked shadow: weights mapped, waiting on the failover lock; requests wait for ACTIVE (bounded)
WAKING    got the failover lock: adopting the KV pool and rebuilding the prefix cache
ACTIVE    serving
SLEEPING  ACTIVE <-> SLEEPING on request (POST /engine/control/sleep and /wake_up): weights and KV
          unmapped, nothing admitted
QUIESCED  STANDBY / SLEEPING <-> QUIESCED around a snapshot (POST /engine/control/quiesce and /resume):
          nothing mapped, no memory-service connection; a promotion waits for the resume
DRAINING  SIGTERM: finishing in-flight requests, admitting none
DEAD      cannot serve any more (a failed promotion or quiesce, weights whose layout changed under it, a step
          that raised or hung, a device marked faulty); the process exits
"""

from __future__ import annotations

STATES = ("INIT", "STANDBY", "WAKING", "ACTIVE", "SLEEPING", "QUIESCED", "DRAINING", "DEAD")
