"""One node: `understudy up` (supervisor: memory service, active engine, shadows, frontend), restoring
shadows from snapshots on the node (snapshots), and `understudy status`.
"""
