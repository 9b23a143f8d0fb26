"""Training: `loop.train(cfg)` and the components it calls (state, step, throughput, validation,
checkpointing, stop signals). The loop reads as single-process code; rank plumbing is in `dist`."""
