"""Triton kernels, one module per op; imported lazily, only when the triton backend runs."""
