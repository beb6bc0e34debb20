"""Compute kernels behind a small backend interface (`kernels.backend`).

Each op has a torch path (the reference, and the CPU fast path) and, where it pays, a
Triton kernel with a thin launcher. Model code only ever sees `KernelBackend` methods.
"""
