"""Run records: metrics.jsonl (always), optional tensorboard / wandb, and plots."""
