"""Tensor-parallel groups, one process per device: the leader (group), a worker rank (rank), and how they
talk (comm). See docs/tensor-parallel.md.
"""
