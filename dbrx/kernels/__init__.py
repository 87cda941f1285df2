"""Compute kernels used by the model: grouped expert matmuls (torch and Triton) and their LoRA form, attention
masks, the chunked lm-head loss, and the CPU few-row kernels (C++ in cpu/, built on first use: int8/int4 and
threaded fp32). Imports: torch, triton (optional), dbrx.compat; never the model."""
