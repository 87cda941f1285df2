"""Compute kernels used by the model: grouped expert matmuls (torch and Triton) and their LoRA form, attention
masks, the chunked lm-head loss. Imports: torch, triton (optional), dbrx.compat; never the model."""
