"""Failover on one node: the promotion lock (and, later, the supervisor)."""

from .lock import FailoverLock, LockHeld

__all__ = ["FailoverLock", "LockHeld"]
