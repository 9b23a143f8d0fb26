"""Augmentations keep raw and labels aligned; the weight map follows the U-Net paper."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from unet_dist.config import AugmentConfig, load_config
from unet_dist.data import augment as A
from unet_dist.errors import UserError


def smooth_raw(shape, seed=0):
    """Blobs of a few pixels, so thresholding gives cell-like labels."""
    rng = np.random.default_rng(seed)
    raw = ndimage.gaussian_filter(rng.random(shape), 3)
    raw = (raw - raw.min()) / (raw.max() - raw.min())
    return raw.astype(np.float32)


def threshold(raw):
    return (raw > 0.5).astype(np.uint8)


PAPER = dict(grid=3, sigma=10.0)  # the paper's deformation: 3 x 3 control points, 10 px
BORDER = dict(w0=10, sigma=5)  # the paper's border weights


def aug_cfg(**kw):
    return AugmentConfig(**kw)


@pytest.mark.parametrize("shape", [(32, 32), (32, 48), (6, 32, 32), (6, 32, 40)])
def test_flip_rot_keeps_raw_and_label_aligned(shape):
    raw = smooth_raw(shape)
    seen = set()
    for seed in range(40):
        r, lab = A.flip_rot(np.random.default_rng(seed), raw, threshold(raw))
        assert r.shape == raw.shape
        np.testing.assert_array_equal(lab, threshold(r))
        seen.add(r.tobytes())
    # 2D square: the 8 symmetries of a square; non-square: 4; 3D doubles with the z flip
    expected = (8 if shape[-1] == shape[-2] else 4) * (2 if len(shape) == 3 else 1)
    assert len(seen) == expected


def test_elastic_keeps_labels_binary_and_aligned():
    raw = smooth_raw((96, 96))
    lab = threshold(raw)
    r, l2, w = A.elastic_deform(np.random.default_rng(1), lab.astype(np.float32), lab,
                                np.ones_like(raw), **PAPER)
    assert l2.dtype == np.uint8 and set(np.unique(l2)) <= {0, 1}
    assert not np.array_equal(l2, lab)  # it did move
    # raw interpolated linearly, labels by nearest neighbour: they agree almost everywhere
    assert (l2 == (r > 0.5)).mean() > 0.99
    np.testing.assert_allclose(w, 1.0, rtol=1e-6)


def test_elastic_is_deterministic_per_seed():
    raw = smooth_raw((64, 80))
    lab = threshold(raw)
    a = A.elastic_deform(np.random.default_rng(7), raw, lab, **PAPER)
    b = A.elastic_deform(np.random.default_rng(7), raw, lab, **PAPER)
    c = A.elastic_deform(np.random.default_rng(8), raw, lab, **PAPER)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


def test_elastic_is_identity_at_zero_magnitude():
    raw = smooth_raw((4, 40, 56))
    lab = threshold(raw)
    r, l2 = A.elastic_deform(np.random.default_rng(0), raw, lab, grid=3, sigma=0.0)
    np.testing.assert_allclose(r, raw, atol=1e-6)
    np.testing.assert_array_equal(l2, lab)


def test_elastic_3d_moves_every_section_the_same_way():
    section = smooth_raw((48, 48))
    raw = np.repeat(section[None], 5, axis=0)
    r, lab = A.elastic_deform(np.random.default_rng(3), raw, threshold(raw), **PAPER)
    assert not np.allclose(r[0], section)
    for z in range(1, 5):
        np.testing.assert_array_equal(r[z], r[0])
        np.testing.assert_array_equal(lab[z], lab[0])


def test_misalignment_shifts_the_sections_above_a_cut():
    raw = smooth_raw((8, 40, 40))
    max_px = 4
    moved = 0
    for seed in range(20):
        r, lab = A.misalign(np.random.default_rng(seed), raw, threshold(raw), max_px=max_px)
        np.testing.assert_array_equal(lab, threshold(r))  # labels moved with raw
        same = [np.array_equal(r[z], raw[z]) for z in range(8)]
        z0 = same.index(False) if False in same else 8
        assert z0 >= 1 and all(same[:z0])
        if z0 == 8:
            continue  # drew a zero shift
        moved += 1
        inner = slice(max_px, -max_px)
        shifts = [(dy, dx) for dy in range(-max_px, max_px + 1) for dx in range(-max_px, max_px + 1)
                  if np.array_equal(r[z0:, inner, inner],
                                    np.roll(raw[z0:], (dy, dx), axis=(1, 2))[:, inner, inner])]
        assert len(shifts) == 1 and shifts[0] != (0, 0)
    assert moved >= 15


def test_missing_sections():
    raw = smooth_raw((10, 16, 16))
    assert A.missing_sections(np.random.default_rng(0), raw, 0.0) is raw
    assert not A.missing_sections(np.random.default_rng(0), raw, 1.0).any()
    out = A.missing_sections(np.random.default_rng(0), raw, 0.5)
    lost = [not out[z].any() for z in range(10)]
    assert 0 < sum(lost) < 10
    for z in range(10):
        if not lost[z]:
            np.testing.assert_array_equal(out[z], raw[z])


def test_intensity_and_noise_stay_in_range():
    raw = smooth_raw((4, 32, 32))
    out = A.intensity(np.random.default_rng(0), raw)
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert not np.allclose(out, raw)
    noisy = A.gaussian_noise(np.random.default_rng(0), raw, 0.1)
    assert 0 <= noisy.min() and noisy.max() <= 1
    assert 0.05 < np.std(noisy - raw) < 0.1


@pytest.mark.parametrize("shape", [(64, 64), (8, 64, 64)])
def test_augmenter_end_to_end(shape):
    cfg = aug_cfg(noise_std=0.05, missing_section_p=0.2, misalign_p=0.5, misalign_max_px=3)
    augment = A.Augmenter(cfg)
    raw = smooth_raw(shape)
    lab = threshold(raw)
    weight = A.unet_weight_map(lab, **BORDER)
    r1, l1, w1 = augment(np.random.default_rng(5), raw, lab, weight)
    r2, l2 = augment(np.random.default_rng(5), raw, lab)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(l1, l2)
    for a in (r1, l1, w1):
        assert a.shape == shape and a.flags.c_contiguous
    assert r1.dtype == np.float32 and 0 <= r1.min() and r1.max() <= 1
    assert set(np.unique(l1)) <= {0, 1} and w1.min() > 0
    off = A.Augmenter(AugmentConfig.disabled())(np.random.default_rng(5), raw, lab)
    np.testing.assert_array_equal(off[0], raw)
    assert A.context_margin(cfg) == 0


@pytest.mark.parametrize("key,value", [
    ("misalign_p", 1.5), ("missing_section_p", -0.1), ("noise_std", -1), ("elastic_sigma", "10"),
    ("elastic_grid", 1), ("misalign_max_px", 2.5), ("flip", "yes")])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(UserError, match=f"^augment config: data.augment.{key}:"):
        A.Augmenter(aug_cfg(**{key: value}))
    if key == "elastic_sigma":
        return  # in YAML text, "10" is a number
    with pytest.raises(UserError, match=f"^command line: data.augment.{key}:"):  # the same rule from YAML
        load_config(None, [f"data.augment.{key}={value!r}"])


def test_3d_only_settings_rejected_for_2d_models():
    with pytest.raises(UserError, match="data.augment.misalign_p.*3D"):
        A.Augmenter(aug_cfg(misalign_p=0.1, misalign_max_px=2), dims=2)
    A.Augmenter(aug_cfg(misalign_p=0.1, misalign_max_px=2), dims=3)


def test_weight_map_class_balance():
    lab = np.zeros((4, 4), np.uint8)
    lab[1:3, 1:3] = 1  # one object: no border term
    w = A.unet_weight_map(lab, w0=10, sigma=5)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w[lab == 1], 16 / (2 * 4))
    np.testing.assert_allclose(w[lab == 0], 16 / (2 * 12))
    assert w.mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(A.unet_weight_map(np.ones((5, 5), np.uint8), **BORDER), 1.0)


def test_weight_map_is_high_on_thin_membranes_between_cells():
    lab = np.zeros((64, 140), np.uint8)
    lab[10:30, 10:40] = 1
    lab[10:30, 42:72] = 1  # two cells, two pixels apart
    lab[10:30, 100:130] = 1  # a lone cell
    w = A.unet_weight_map(lab, w0=10, sigma=5)
    base = A.unet_weight_map(lab, w0=0, sigma=5)
    between, far = (20, 40), (50, 115)
    assert w[between] - base[between] == pytest.approx(10 * np.exp(-(1 + 2) ** 2 / 50), rel=1e-5)
    assert w[far] - base[far] < 1e-3
    assert w[between] > w[far] + 5
    np.testing.assert_array_equal(w[lab == 1], base[lab == 1])  # interior pixels: class weight only


def brute_force_weight_map(lab, w0, sigma):
    objects, n = ndimage.label(lab != 0)
    dist = np.sort(np.stack([ndimage.distance_transform_edt(objects != i) for i in range(1, n + 1)]),
                   axis=0)
    border = w0 * np.exp(-(dist[0] + dist[1]) ** 2 / (2 * sigma ** 2)) * (lab == 0)
    return A.unet_weight_map(lab, w0=0, sigma=5) + border


def test_weight_map_matches_brute_force():
    lab = threshold(smooth_raw((80, 96), seed=4))
    assert ndimage.label(lab)[1] > 5
    for sigma in (2.0, 5.0):
        np.testing.assert_allclose(A.unet_weight_map(lab, 10, sigma), brute_force_weight_map(lab, 10, sigma),
                                   atol=10 * 1e-4 + 1e-5)
    volume = np.stack([lab, lab[::-1]])
    np.testing.assert_allclose(A.unet_weight_map(volume, **BORDER)[1], A.unet_weight_map(lab[::-1], **BORDER))


def test_the_default_augmenter_is_the_configs():
    """config/sections.py holds the only defaults: the augmenter of `AugmentConfig()` adds its noise_std and
    misaligns by up to its misalign_max_px (a second defaults table once had 0.0 and 0 here)."""
    defaults = AugmentConfig()
    assert defaults.noise_std > 0 and defaults.misalign_max_px > 0
    assert A.Augmenter(defaults).cfg == defaults
    flat = np.full((32, 32), 0.5, np.float32)
    only_noise = dataclasses.replace(AugmentConfig.disabled(), noise_std=defaults.noise_std)
    noisy, _ = A.Augmenter(only_noise)(np.random.default_rng(0), flat, np.ones((32, 32), np.uint8))
    assert np.std(noisy - flat) == pytest.approx(defaults.noise_std, rel=0.15)
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (4, 64, 1))  # varies along x only
    shifts = set()
    only_misalign = dataclasses.replace(AugmentConfig.disabled(), misalign_p=1.0)
    for seed in range(30):
        moved, _ = A.Augmenter(only_misalign)(np.random.default_rng(seed), ramp, np.ones(ramp.shape, np.uint8))
        z = next((z for z in range(1, 4) if not np.array_equal(moved[z], ramp[z])), None)
        if z is not None:  # content moved by dx: the ramp's value at the middle column says how far
            shifts.add(round(float(moved[z, 0, 32] - ramp[z, 0, 32]) * 63))
    assert max(abs(s) for s in shifts) == defaults.misalign_max_px


def test_disabled_leaves_a_patch_as_it_is():
    raw = smooth_raw((6, 32, 32))
    r, lab = A.Augmenter(AugmentConfig.disabled())(np.random.default_rng(0), raw, threshold(raw))
    np.testing.assert_array_equal(r, raw)
    np.testing.assert_array_equal(lab, threshold(raw))


def test_only_typed_config():
    with pytest.raises(TypeError, match="AugmentConfig"):
        A.Augmenter(None)
