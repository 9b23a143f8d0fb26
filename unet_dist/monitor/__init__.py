"""What a person watches while a job runs: one progress display (`progress`) and the training
run's log (`training`: metrics.jsonl, W&B)."""
