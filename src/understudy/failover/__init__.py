"""Failover on one node: the promotion lock (and, later, the supervisor)."""

from understudy.failover.lock import FailoverLock, LockHeld

__all__ = ["FailoverLock", "LockHeld"]
