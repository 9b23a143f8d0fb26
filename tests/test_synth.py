"""Synthetic EM volumes: deterministic, slab-independent, plausible, in the same store layout."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from unet_dist.data import slab_writer
from unet_dist.data import store as st
from unet_dist.data.convert import store_info
from unet_dist.data.synth import SynthVolume, synthesize
from unet_dist.errors import UserError



def arrays(path):
    group = zarr.open_group(str(path), mode="r")
    return group[st.RAW][:], group[st.TARGET_PATH][:]


def test_deterministic_and_slab_independent(tiny_synth_store, tmp_path, monkeypatch):
    raw, labels = arrays(tiny_synth_store)
    # Same seed, other slab sizes (4-slice chunks; 8-slice shards): the same volume.
    synthesize(tmp_path / "a.zarr", shape=(8, 96, 128), seed=0, chunks=(4, 48, 64))
    monkeypatch.setattr(slab_writer, "READ_AHEAD_BYTES", 0)  # and the serial path, without read-ahead
    synthesize(tmp_path / "b.zarr", shape=(8, 96, 128), seed=0, chunks=(2, 96, 128),
               shard=(8, 96, 128))
    for other in ("a.zarr", "b.zarr"):
        raw2, labels2 = arrays(tmp_path / other)
        np.testing.assert_array_equal(raw2, raw)
        np.testing.assert_array_equal(labels2, labels)
    # A slice depends on (seed, z) only, not on where the volume starts or ends.
    volume = SynthVolume((8, 96, 128), seed=0)
    np.testing.assert_array_equal(volume.slab(5, 7)["raw"], raw[5:7])
    longer = SynthVolume((20, 96, 128), seed=0)
    np.testing.assert_array_equal(longer.slice(3)[1], labels[3])
    synthesize(tmp_path / "c.zarr", shape=(8, 96, 128), seed=1)
    raw3, labels3 = arrays(tmp_path / "c.zarr")
    assert (raw3 != raw).mean() > 0.5 and (labels3 != labels).mean() > 0.1


def test_plausible_em(tmp_path):
    summary = synthesize(tmp_path / "s.zarr", shape=(6, 256, 256), seed=3)
    raw, labels = arrays(tmp_path / "s.zarr")
    assert raw.dtype == labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1}
    membrane = 1 - labels.mean()
    assert 0.18 < membrane < 0.28  # ISBI: 0.22
    assert summary["label_fraction"] == pytest.approx(labels.mean())
    assert raw[labels == 0].mean() < raw[labels == 1].mean() - 40
    assert raw.std() > 20 and raw.min() < 60 and raw.max() > 200
    # Tubes along z: neighbouring slices share most of their labels; a random pair would not.
    assert (labels[1:] == labels[:-1]).mean() > 0.85


def test_store_layout_and_metadata(tiny_synth_store):
    group = st.open_store(tiny_synth_store, arrays=(st.RAW, st.TARGET_PATH))
    assert st.voxel_size(group) == (50.0, 4.0, 4.0)
    assert [m["name"] for m in group.attrs["ome"]["multiscales"]] == ["raw"]
    assert group[st.RAW].metadata.dimension_names == ("z", "y", "x")
    source = group.attrs["unet_dist"]["sources"]["synthetic"]
    assert source["seed"] == 0 and source["shape"] == [8, 96, 128]
    info = store_info(tiny_synth_store)
    assert info["arrays"]["0"]["chunks"] == [1, 96, 128]
    assert 0.7 < info["arrays"][st.TARGET_PATH]["label_fraction"] < 0.85


def test_refuses_existing_store(tiny_synth_store):
    with pytest.raises(UserError, match="already exists"):
        synthesize(tiny_synth_store, shape=(2, 32, 32))
    with pytest.raises(UserError, match="shape"):
        synthesize(tiny_synth_store.parent / "bad.zarr", shape=(0, 32, 32))
