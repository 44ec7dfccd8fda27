"""The decoder's kernels: paged attention (plain-torch reference and Triton) and fused Triton elementwise ops.
"""
