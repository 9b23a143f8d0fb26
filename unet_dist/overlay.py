"""Pictures of masks shared by `report` (PNGs) and the monitor (W&B): pure numpy, no drawing library."""

from __future__ import annotations

import numpy as np

MISSED, INVENTED = (230, 30, 30), (40, 120, 255)  # missed membrane, invented membrane
CLASS_LABELS = {0: "membrane", 1: "neuron interior"}


def error_panel(raw: np.ndarray, label: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB uint8 (Y, X, 3): dimmed raw, red = missed membrane, blue = invented membrane."""
    gray = (np.clip(raw, 0, 1) * 150 + 40).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    truth, pred = label > 0, mask > 0
    rgb[pred & ~truth] = MISSED
    rgb[~pred & truth] = INVENTED
    return rgb
