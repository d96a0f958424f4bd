"""Online index estimation: real queries and keys in, per-head indices out.

Every estimator is one batched computation over all heads and batch elements (no per-head Python loop)
and reads K through grouped-query reshapes of Q, never through repeated K/V.
"""
