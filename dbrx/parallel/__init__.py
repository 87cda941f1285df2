"""Applied to a built model from outside: activation checkpointing, compile, FSDP sharding."""
