"""@triton.jit kernels, one file per op family."""
