"""Triton kernels, each with the torch path in `model/` as its CPU fallback and reference.
On CPU they run under TRITON_INTERPRET=1 (tests); on CUDA they are the fast path."""
