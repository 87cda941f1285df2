"""Training: data preparation and loading, SFT data, the trainer, training-state checkpoints, metrics, plots.
Imports: the model, config, tokenizer, hf_checkpoint, fsutil, parallel; never dbrx.cli."""
