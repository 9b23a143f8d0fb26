"""Data: EM volumes to Zarr stores (convert, synth) and training patches out of them."""
