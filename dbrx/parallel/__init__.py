"""Applied to a built model from outside, in this order: activation checkpointing, compile, FSDP sharding.
Imports: torch, dbrx.kernels, dbrx.compat; never the model module (they act on any DbrxForCausalLM-like model)."""
