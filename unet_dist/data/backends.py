"""Which codec pipeline decodes and encodes our Zarr chunks: zarr-python's own, or `zarrs` (Rust).

`predict.codec_pipeline` picks one; the arrays keep the pipeline they were opened with, so the
switch is applied by reopening them rather than by changing zarr's global configuration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import zarr

from unet_dist.errors import UserError

PIPELINES = {"zarr": "zarr.core.codec_pipeline.BatchedCodecPipeline", "zarrs": "zarrs.ZarrsCodecPipeline"}


@contextlib.contextmanager
def codec_pipeline(name: str) -> Iterator[None]:
    """Arrays opened inside use the pipeline `name` ("zarr" leaves zarr's configuration alone)."""
    if name == "zarr":
        yield
        return
    if name not in PIPELINES:
        raise UserError(f"predict.codec_pipeline: '{name}' is not one of {', '.join(PIPELINES)}")
    try:
        import zarrs  # noqa: F401
    except ImportError:
        raise UserError("predict.codec_pipeline: 'zarrs' needs the zarrs package (pip install zarrs, "
                        "or the project's [bench] extra)") from None
    with zarr.config.set({"codec_pipeline.path": PIPELINES[name]}):
        yield


def reopen(array, name: str):
    """`array` (a zarr.Array) opened again with the codec pipeline `name`; itself for "zarr"."""
    if name == "zarr" or not isinstance(array, zarr.Array):
        return array
    with codec_pipeline(name):
        return zarr.open_array(array.store_path, mode="r")
