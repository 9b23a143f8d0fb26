"""unet_dist: distributed U-Net training and tiled prediction for EM volumes in Zarr."""

__version__ = "0.1.0"
