"""Compute kernels used by the model: grouped expert matmuls (and, on GPUs, Triton versions)."""
