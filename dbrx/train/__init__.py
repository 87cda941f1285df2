"""Training: data preparation and loading, pre-training and fine-tuning."""
