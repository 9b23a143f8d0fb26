"""Tiled prediction: the pure block plan, the model side (tiles in, probabilities out), the
read -> compute -> write pipeline, its outputs and manifest, and the prediction store's format."""
