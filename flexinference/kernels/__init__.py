"""Hand-written Triton kernels and their pure-PyTorch references."""
