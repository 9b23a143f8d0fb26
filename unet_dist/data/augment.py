"""Augmentations for EM training patches, and the U-Net paper's weight map.

Everything is a function of a `numpy.random.Generator` and arrays, so the caller decides the seed
(the patch stream derives it from seed, rank and batch index). Arrays are 2D (Y, X) or 3D (Z, Y, X);
raw is float in [0, 1], labels are 1 = neuron interior, 0 = membrane (or int32 instance IDs, for
affinity targets: nearest-neighbour moves only ever copy an ID, so they stay IDs), an optional weight
map is float. Geometric transforms move raw, label and weight together; intensity transforms touch raw only.

Elastic deformation is done in place, at the patch's own size, with reflecting borders: the
displacements (about 10 px) are small against a patch, and reading a larger patch and cropping
would make every caller track a margin. `context_margin` says so (0) for callers that ask.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage
from scipy.interpolate import make_interp_spline

from unet_dist.config import AugmentConfig, validate_augment

# Ranges of the intensity augmentation (per section in 3D, as EM sections vary in staining and
# thickness): contrast factor 1 +- CONTRAST around the mean, brightness offset +- BRIGHTNESS,
# gamma 2 ** (+- GAMMA_LOG2).
CONTRAST, BRIGHTNESS, GAMMA_LOG2 = 0.25, 0.1, 0.5


# ------------------------------------------------------------------------------------- geometric

def flip_rot(rng: np.random.Generator, *arrays: np.ndarray, flip: bool = True,
             rot90: bool = True) -> tuple[np.ndarray, ...]:
    """The same random flips (each axis, z included in 3D) and rotation by k * 90 degrees in the
    y, x plane to every array. A non-square y, x plane is only rotated by 0 or 180 degrees, so the
    shape never changes. Returns views (negative strides)."""
    ndim = arrays[0].ndim
    if flip:
        axes = tuple(a for a, coin in enumerate(rng.random(ndim) < 0.5) if coin)
        arrays = tuple(np.flip(a, axes) for a in arrays) if axes else arrays
    if rot90:
        y, x = ndim - 2, ndim - 1
        square = arrays[0].shape[y] == arrays[0].shape[x]
        k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
        arrays = tuple(np.rot90(a, k, axes=(y, x)) for a in arrays)
    return tuple(arrays)


@functools.lru_cache(maxsize=32)
def _spline_matrix(points: int, size: int) -> np.ndarray:
    """(size, points): cubic-spline interpolation, at every pixel, of values on `points` control
    points spread evenly over [0, size - 1]. A matrix per axis turns the coarse field into the
    dense one with two small matrix products, much faster than zooming the field."""
    knots = np.linspace(0.0, size - 1.0, points)
    spline = make_interp_spline(knots, np.eye(points), k=min(3, points - 1))
    return np.ascontiguousarray(spline(np.arange(size)), dtype=np.float32)


def elastic_coordinates(rng: np.random.Generator, shape_yx: tuple[int, int], grid: int,
                        sigma: float) -> np.ndarray:
    """Sampling coordinates (2, Y, X) of the paper's deformation: displacement vectors drawn from
    N(0, sigma) on a coarse grid x grid lattice of control points spread over the patch,
    interpolated by cubic splines (sigma in pixels; the paper: 3 x 3, 10 px)."""
    ny, nx = shape_yx
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid)).astype(np.float32)
    wy, wx = _spline_matrix(grid, ny), _spline_matrix(grid, nx)
    # wy @ coarse @ wx.T without BLAS: its two small matrix products woke every OpenBLAS thread in
    # every loader worker (17 ms per 512^2 patch against 2-3 ms for these broadcasts).
    right = np.einsum("cij,xj->cix", coarse, wx)  # (2, grid, X), tiny
    coords = np.zeros((2, ny, nx), np.float32)
    for i in range(grid):
        coords += wy[None, :, i, None] * right[:, i, None, :]  # (2, Y, X) displacements
    coords[0] += np.arange(ny, dtype=np.float32)[:, None]
    coords[1] += np.arange(nx, dtype=np.float32)[None, :]
    return coords


def warp(array: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """Resample a 2D array, or each z section of a 3D one, at the (2, Y, X) coordinates."""
    if array.ndim == 2:
        return ndimage.map_coordinates(array, coords, order=order, mode="reflect")
    out = np.empty(array.shape, array.dtype)
    for z in range(array.shape[0]):  # sections are cut and deformed independently in EM
        ndimage.map_coordinates(array[z], coords, output=out[z], order=order, mode="reflect")
    return out


def elastic_deform(rng: np.random.Generator, raw: np.ndarray, label: np.ndarray,
                   weight: np.ndarray | None = None, *, grid: int,
                   sigma: float) -> tuple[np.ndarray, ...]:
    """One random deformation of y, x (the same for every z section): raw and weight linearly
    interpolated, labels by nearest neighbour so they keep their values."""
    coords = elastic_coordinates(rng, raw.shape[-2:], grid, sigma)
    out = (warp(raw, coords, order=1), warp(label, coords, order=0))
    return out if weight is None else (*out, warp(weight, coords, order=1))


def _shift_yx(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move content by (dy, dx) in the last two axes, filling the exposed border by reflection."""
    my, mx = abs(dy), abs(dx)
    padded = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(my, my), (mx, mx)], mode="reflect")
    ny, nx = a.shape[-2:]
    return padded[..., my - dy:my - dy + ny, mx - dx:mx - dx + nx]


def misalign(rng: np.random.Generator, *arrays: np.ndarray, max_px: int) -> tuple[np.ndarray, ...]:
    """3D: shift every section above a random z by the same random (dy, dx) in [-max_px, max_px],
    as an imperfect section alignment does; all arrays move together."""
    nz = arrays[0].shape[0]
    z0 = int(rng.integers(1, nz))
    dy, dx = (int(v) for v in rng.integers(-max_px, max_px + 1, size=2))
    out = []
    for a in arrays:
        a = a.copy()
        a[z0:] = _shift_yx(a[z0:], dy, dx)
        out.append(a)
    return tuple(out)


# ------------------------------------------------------------------------------------- intensity

def missing_sections(rng: np.random.Generator, raw: np.ndarray, p: float) -> np.ndarray:
    """3D: each z section of raw is blanked (zeros) with probability p; labels stay, so the network
    learns to bridge a lost section from its neighbours."""
    lost = rng.random(raw.shape[0]) < p
    if not lost.any():
        return raw
    raw = raw.copy()
    raw[lost] = 0
    return raw


def intensity(rng: np.random.Generator, raw: np.ndarray) -> np.ndarray:
    """Random contrast (around the mean), brightness and gamma, per z section in 3D; stays in [0, 1]."""
    sections = 1 if raw.ndim == 2 else raw.shape[0]
    shape = (sections, 1, 1)[-raw.ndim:]
    contrast = rng.uniform(1 - CONTRAST, 1 + CONTRAST, sections).astype(np.float32).reshape(shape)
    bright = rng.uniform(-BRIGHTNESS, BRIGHTNESS, sections).astype(np.float32).reshape(shape)
    gamma = np.exp2(rng.uniform(-GAMMA_LOG2, GAMMA_LOG2, sections)).astype(np.float32).reshape(shape)
    mean = raw.mean(axis=(-2, -1), keepdims=True, dtype=np.float32)
    out = (raw - mean) * contrast + (mean + bright)
    np.clip(out, 0.0, 1.0, out=out)
    return np.power(out, gamma, out=out)


def gaussian_noise(rng: np.random.Generator, raw: np.ndarray, std: float) -> np.ndarray:
    out = raw + std * rng.standard_normal(raw.shape, dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


# ------------------------------------------------------------------------------------- pipeline

class Augmenter:
    """Applies the configured augmentations to one patch: flips/rotations, elastic deformation,
    misalignment (3D), intensity, noise, missing sections (3D), in that order.

    `cfg` is the run's `data.augment` (`AugmentConfig.disabled()`: none). Give `dims` to have
    3D-only settings rejected for 2D models; without it they are skipped on 2D patches."""

    def __init__(self, cfg: AugmentConfig, dims: int | None = None):
        if not isinstance(cfg, AugmentConfig):
            raise TypeError(f"expected an AugmentConfig (unet_dist.config), got {type(cfg).__name__}")
        validate_augment(cfg, "augment config", dims)
        self.cfg = cfg

    def __call__(self, rng: np.random.Generator, raw: np.ndarray, label: np.ndarray,
                 weight: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """(raw, label) or, given a weight map, (raw, label, weight); contiguous, same shapes."""
        c = self.cfg
        raw = np.asarray(raw, dtype=np.float32)
        arrays = (raw, label) if weight is None else (raw, label, weight)
        if c.flip or c.rot90:
            arrays = flip_rot(rng, *arrays, flip=c.flip, rot90=c.rot90)
        if c.elastic and c.elastic_sigma > 0:
            arrays = elastic_deform(rng, *arrays, grid=c.elastic_grid, sigma=c.elastic_sigma)
        is3d = raw.ndim == 3 and raw.shape[0] > 1
        if is3d and c.misalign_max_px > 0 and rng.random() < c.misalign_p:
            arrays = misalign(rng, *arrays, max_px=c.misalign_max_px)
        raw, rest = arrays[0], arrays[1:]
        if c.intensity:
            raw = intensity(rng, raw)
        if c.noise_std > 0:
            raw = gaussian_noise(rng, raw, c.noise_std)
        if is3d and c.missing_section_p > 0:
            raw = missing_sections(rng, raw, c.missing_section_p)
        return tuple(np.ascontiguousarray(a) for a in (raw, *rest))


def context_margin(aug_cfg: AugmentConfig) -> int:
    """Extra y, x context per side the patch reader should add for augmentation: 0, as elastic
    deformation and misalignment work in place with reflecting borders (see module docstring)."""
    return 0


# ------------------------------------------------------------------------------------ weight map

def _two_nearest_distances(objects: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest object, capped at `cutoff`. Each object's
    distance transform runs only on its bounding box grown by the cutoff: beyond that its distance
    is capped anyway, which makes the cost per object local instead of a full-image transform."""
    d1 = np.full(objects.shape, cutoff, np.float32)
    d2 = np.full(objects.shape, cutoff, np.float32)
    margin = math.ceil(cutoff)
    for index, box in enumerate(ndimage.find_objects(objects), start=1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n))
                    for s, n in zip(box, objects.shape))
        d = ndimage.distance_transform_edt(objects[box] != index).astype(np.float32)
        np.minimum(d, cutoff, out=d)
        near, second = d1[box], d2[box]  # views: updated in place
        np.minimum(second, np.maximum(near, d), out=second)
        np.minimum(near, d, out=near)
    return d1, d2


def unet_weight_map(label: np.ndarray, w0: float, sigma: float, valid=None) -> np.ndarray:
    """The U-Net paper's weight map, float32: w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) where
    the border term is on membrane pixels only and d1, d2 are the distances to the nearest and the
    second-nearest neuron (4-connected component of label != 0).

    w_c balances the classes: a pixel of class c weighs N / (2 N_c), so both classes carry half of
    the total weight and the mean weight is 1 (all ones if a class is absent). A 3D array is done
    per z section, as the paper's 2D definition asks. `valid` (optional, same shape): the class
    counts come from these voxels only (the others are unlabelled; callers weigh them 0)."""
    label = np.asarray(label)
    if label.ndim == 3:
        return np.stack([unet_weight_map(s, w0, sigma, None if valid is None else valid[z])
                         for z, s in enumerate(label)])
    interior = label != 0
    if valid is None:
        n, n1 = interior.size, int(interior.sum())
    else:
        valid = np.asarray(valid) != 0
        n, n1 = int(valid.sum()), int((interior & valid).sum())
    weight = np.ones(label.shape, np.float32)
    if 0 < n1 < n:
        weight[interior] = n / (2 * n1)
        weight[~interior] = n / (2 * (n - n1))
    if w0 <= 0 or sigma <= 0:
        return weight
    objects, count = ndimage.label(interior)  # default structure: 4-connected in 2D
    if count < 2:
        return weight
    # beyond this (d1 + d2) the border term is below 1e-4 * w0; capping the distances there makes
    # the sum at least as large, so the capped map differs from the exact one by less than that
    cutoff = sigma * math.sqrt(2 * math.log(1e4))
    d1, d2 = _two_nearest_distances(objects, cutoff)
    membrane = ~interior
    s = d1[membrane] + d2[membrane]
    weight[membrane] += w0 * np.exp(-(s * s) / (2 * sigma * sigma))
    return weight
