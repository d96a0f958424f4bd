"""Sparse attention masks: index tensors in, FlexAttention BlockMask out."""
