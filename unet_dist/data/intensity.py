"""Raw intensities as the model takes them: [0, 1].

Integers are scaled by their type's range when they are read (`patches.to_unit_float`): uint8 / 255,
uint16 / 65535. A float volume has no such range (a float16 TIFF may hold 0-255, a float32 one 0-1 or
any calibrated unit), so `convert` scales it to [0, 1] once, by `--intensity-range LO,HI` or, with a
`warning:` line, by the range it measures, stores float32 and records what it did (`intensity` in the
store's provenance). The trainer records the same rule in its checkpoints (`normalisation`), and
`predict` refuses a float input that is not in [0, 1] instead of predicting garbage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from unet_dist.errors import UserError, warn_once

UNIT = (0.0, 1.0)
TOLERANCE = 0.01  # float inputs within [0, 1] up to rounding
NORMALISATION = {"input_range": list(UNIT),
                 "rule": "integers / their type's maximum; floats scaled to [0, 1] by convert (--intensity-range)"}


@dataclass(frozen=True)
class Intensity:
    """How a source's values become [0, 1]: (value - lo) / (hi - lo), clipped."""

    source_dtype: str
    lo: float
    hi: float
    origin: str  # "type range" | "--intensity-range" | "measured"

    def record(self) -> dict:
        return asdict(self)

    @property
    def scales(self) -> bool:
        """Whether convert rewrites the values (floats), rather than storing them as they are."""
        return np.dtype(self.source_dtype).kind == "f"

    def apply(self, slab: np.ndarray) -> np.ndarray:
        if not self.scales:
            return slab
        scaled = (slab.astype(np.float32) - np.float32(self.lo)) / np.float32(self.hi - self.lo)
        return np.clip(scaled, 0.0, 1.0, out=scaled)


def intensity_of(source, given: tuple[float, float] | None) -> Intensity:
    """The rule for a source (`data/sources` interface: dtype, shape, read, name)."""
    dtype = np.dtype(source.dtype)
    if dtype.kind != "f":
        if given is not None:
            raise UserError(f"--intensity-range: {source.path} holds {dtype.name} values, which are scaled by their "
                            "type's range; the option is for float volumes")
        info = np.iinfo(np.uint8 if dtype == bool else dtype)
        return Intensity(dtype.name, float(min(info.min, 0)), float(info.max), "type range")
    if given is not None:
        lo, hi = given
        origin = "--intensity-range"
    else:
        lo, hi = measured_range(source)
        origin = "measured"
        warn_once(f"{source.path}: float intensities ({dtype.name}) scaled to [0, 1] by their measured range "
                  f"[{lo:g}, {hi:g}]; pass --intensity-range LO,HI to choose it (e.g. 0,255 for 8-bit data)")
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise UserError(f"{source.path}: intensity range [{lo:g}, {hi:g}] is empty; pass --intensity-range LO,HI")
    return Intensity(dtype.name, float(lo), float(hi), origin)


def measured_range(source) -> tuple[float, float]:
    """(min, max) over the whole volume, slab by slab (a NaN is the caller's error, found on the write)."""
    lo, hi = math.inf, -math.inf
    step = max(1, source.read_depth)
    for z0 in range(0, source.shape[0], step):
        slab = source.read(z0, min(z0 + step, source.shape[0]))
        finite = slab[np.isfinite(slab)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return lo, hi


def parse_range(text: str | None) -> tuple[float, float] | None:
    """`--intensity-range LO,HI`."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--intensity-range '{text}': expected LO,HI, e.g. 0,255") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise UserError(f"--intensity-range '{text}': expected LO < HI")
    return lo, hi


def check_model_input(array, where: str, normalisation: dict | None = None) -> None:
    """A float input must be in the range the checkpoint's model was trained on ([0, 1]: convert scales
    float volumes); a sample of chunks is read: a float16 volume of 0-255 would otherwise be predicted
    as nearly all one class."""
    if np.dtype(array.dtype).kind != "f":
        return
    low, high = (normalisation or NORMALISATION)["input_range"]
    from unet_dist.data.damaged_chunks import sampled_chunks

    for _, values in sampled_chunks(array):
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        if lo < low - TOLERANCE or hi > high + TOLERANCE:
            raise UserError(f"{where}: float intensities reach [{lo:g}, {hi:g}], but the model takes "
                            f"[{low:g}, {high:g}]; "
                            "convert the volume with unet-dist convert --intensity-range LO,HI (e.g. 0,255)")
