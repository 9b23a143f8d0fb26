"""Instance segmentation of a prediction store, blockwise: fragments, edges, one merge, relabel."""
