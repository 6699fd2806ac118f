"""Triton kernels. Installed as ``scaling_attn_compile.kernels`` (never as a top-level ``kernels``)."""
