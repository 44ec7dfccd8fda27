"""Failover on one node: the promotion lock. The path it starts is walked in engine/serving/promotion.py;
the node supervisor that relaunches engines is understudy.node."""

from understudy.failover.lock import FailoverLock, LockHeld

__all__ = ["FailoverLock", "LockHeld"]
