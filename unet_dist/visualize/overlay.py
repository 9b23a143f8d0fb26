"""Pictures of masks shared by `report` (PNGs) and the monitor (W&B): pure numpy, no drawing library."""

from __future__ import annotations

import numpy as np

MISSED, INVENTED = (230, 30, 30), (40, 120, 255)  # missed membrane, invented membrane
UNLABELLED_TINT = np.array((200, 170, 60), np.float32)  # voxels no metric counts (labels/ignore)
UNLABELLED = 2  # the ground truth's class of an unlabelled voxel in W&B masks
CLASS_LABELS = {0: "membrane", 1: "neuron interior"}
CLASS_LABELS_WITH_UNLABELLED = {**CLASS_LABELS, UNLABELLED: "unlabelled"}


def error_panel(raw: np.ndarray, label: np.ndarray, mask: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (Y, X, 3): dimmed raw, red = missed membrane, blue = invented membrane. Where `valid`
    is False (unlabelled voxels) nothing is an error: the raw is tinted ochre instead, as no metric
    counts those voxels."""
    gray = (np.clip(raw, 0, 1) * 150 + 40).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    truth, pred = label > 0, mask > 0
    counted = np.ones(truth.shape, bool) if valid is None else valid.astype(bool)
    rgb[pred & ~truth & counted] = MISSED
    rgb[~pred & truth & counted] = INVENTED
    if not counted.all():
        rgb[~counted] = (0.5 * rgb[~counted] + 0.5 * UNLABELLED_TINT).astype(np.uint8)
    return rgb


def truth_classes(label: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The ground truth as mask classes: 0 membrane, 1 neuron interior, 2 unlabelled."""
    classes = (label > 0).astype(np.uint8)
    if valid is not None:
        classes[~valid.astype(bool)] = UNLABELLED
    return classes
