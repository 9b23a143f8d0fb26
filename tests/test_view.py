"""`unet-dist view`: layers load and are drawn aligned in a real Chromium; only token holders on
the bound address reach the viewer; napari's reader (ome-zarr-py) sees the same layers.

Browser tests skip when Chromium is missing, unless $UNET_DIST_REQUIRE_ALL is set (.ci/run sets it):
then they fail (helpers.require).
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from unet_dist.predict import prediction_store as pr
from unet_dist.data import store as st
from unet_dist.data.synth import synthesize
from unet_dist.errors import UserError

from helpers import ENV, ROOT, require, require_module, run_cli


def need(module: str):
    return require_module(module, "pip install -e '.[view]'")


@pytest.fixture(scope="module")
def browser():
    need("neuroglancer")
    need("playwright")
    from unet_dist.visualize.view import find_chromium

    try:
        return find_chromium()
    except UserError as exc:
        require(str(exc))


# ---------------------------------------------------------------------------------- stores


def predict_as_labels(ckpt: Path, store: Path, out: Path, slices: tuple[int, int]) -> Path:
    """A prediction store written by `predict` (metadata, levels, translation), whose mask is then set
    to the store's labels of those slices and probability to 255 x labels, so a test knows what must
    appear where."""
    from unet_dist.predict.pipeline import predict

    predict(ckpt, store, out, slices=slices, overrides=["predict.block_size=[1,128,128]"])
    source = zarr.open_group(str(store), mode="r")
    pred = zarr.open_group(str(out), mode="r+")
    targets = source["labels"][st.TARGET]
    for level in pred.attrs["ome"]["multiscales"][0]["datasets"]:
        labels = targets[level["path"]][slices[0]:slices[1]]
        pred["labels"][pr.MASK_NAME][level["path"]][:] = labels
        pred[level["path"]][:] = labels * np.uint8(255)
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, ckpt) -> dict[str, Path]:
    """An input store (8 x 300 x 300, two levels, in shards that the browser reads by byte ranges,
    partial at the edges) and predictions of slices 2:6, 1:3 and 3:5."""
    root = tmp_path_factory.mktemp("view")
    synth = root / "synth.zarr"
    synthesize(synth, shape=(8, 300, 300), seed=0, chunks=(1, 100, 100), shard=(4, 200, 200))
    out = {"store": synth}
    for name, slices in (("a", (2, 6)), ("b", (1, 3)), ("c", (3, 5))):
        out[name] = predict_as_labels(ckpt, synth, root / f"{name}.zarr", slices)
    return out


# ---------------------------------------------------------------------------------- pictures


def load_png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int32)


def central(image: np.ndarray, rect, frac: float = 0.32) -> np.ndarray:
    """The middle of a panel (inside the data: the volume fills 90% of the panel's shorter side)."""
    x, y, w, h = rect
    cx, cy, r = x + w / 2, y + h / 2, frac * min(w, h)
    return image[int(cy - r):int(cy + r), int(cx - r):int(cx + r)]


def interior(panel: np.ndarray, kind: str) -> np.ndarray:
    """Where a panel shows neuron interior: green label overlay, orange mask overlay, or the
    probability ramp's yellow end (viridis red channel is above 0.5 only near p = 1)."""
    r, g, b = panel[..., 0], panel[..., 1], panel[..., 2]
    if kind == "label":
        return g > r + 25
    if kind == "mask":
        return r > b + 40
    if kind == "probability":
        return r > 128
    raise ValueError(kind)


def agreement(a: np.ndarray, b: np.ndarray, shift: int = 3) -> float:
    """The best fraction of equal pixels over shifts of up to `shift` pixels (panels of a row or
    column may differ by a pixel in size)."""
    n = min(a.shape[0], b.shape[0]) - 2 * shift, min(a.shape[1], b.shape[1]) - 2 * shift
    core = a[shift:shift + n[0], shift:shift + n[1]]
    return max(float((core == b[shift + dy:shift + dy + n[0], shift + dx:shift + dx + n[1]]).mean())
               for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1))


def run_view(*args, timeout: float = 400):
    done = run_cli("view", *args, env={"OMP_NUM_THREADS": "1"}, timeout=timeout)
    assert done.code == 0, done.err
    return json.loads(done.out.strip().splitlines()[-1])


def test_screenshot_shows_every_layer_loaded_and_aligned(browser, stores, tmp_path):
    png = tmp_path / "view.png"
    result = run_view(stores["store"], stores["a"], stores["b"], stores["c"], "--screenshot", png,
                      "--size", "1200,1500")
    names = ["raw", "neuron_interior", "probability", "mask", "probability (b.zarr)", "mask (b.zarr)",
             "probability (c.zarr)", "mask (c.zarr)"]
    assert result["layers"] == {n: "ok" for n in names}, result
    assert result["page_errors"] == []
    panels = {tuple(p["layers"]): p["rect"] for p in result["panels"]}
    assert list(panels) == [("raw",), ("raw", "neuron_interior"), ("probability",), ("raw", "mask"),
                            ("probability (b.zarr)",), ("raw", "mask (b.zarr)"),
                            ("probability (c.zarr)",), ("raw", "mask (c.zarr)")]
    image = load_png(png)
    assert image.shape[:2] == (1500, 1200)

    raw = central(image, panels[("raw",)])
    assert raw.std() > 20, "the raw panel is blank"
    assert np.abs(raw[..., 0] - raw[..., 1]).max() < 8, "raw is not grey"
    label = interior(central(image, panels[("raw", "neuron_interior")]), "label")
    assert 0.3 < label.mean() < 0.95, f"label overlay covers {label.mean():.2f} of its panel"

    # Opened at slice 2, the first slice of the first prediction: a (2:6) and b (1:3) cover it,
    # c (3:5) does not. Each one's probability and mask equal the labels there, pixel for pixel,
    # only if it is placed by its z translation and voxel size.
    for tag in ("", " (b.zarr)"):
        prob = interior(central(image, panels[(f"probability{tag}",)]), "probability")
        mask = interior(central(image, panels[("raw", f"mask{tag}")]), "mask")
        assert agreement(prob, label) > 0.93, tag
        assert agreement(mask, label) > 0.93, tag
    empty = central(image, panels[("probability (c.zarr)",)])
    assert empty.std() < 3, "prediction c (slices 3:5) drawn at slice 2"
    assert not interior(central(image, panels[("raw", "mask (c.zarr)")]), "mask").any()


@pytest.mark.slow
def test_isbi_store_and_prediction_screenshot(browser, isbi_store, ckpt, tmp_path):
    """The README's command on the ISBI stack: a prediction of slices 25:30 (random weights, uint8)
    and one in float16 (the client reads no float16: served from Python)."""
    from unet_dist.predict.pipeline import predict

    pred = tmp_path / "pred.zarr"
    predict(ckpt, isbi_store, pred, slices=(25, 30))
    half = tmp_path / "half.zarr"
    predict(ckpt, isbi_store, half, slices=(25, 30), overrides=["predict.probability_dtype=float16"])
    png = tmp_path / "isbi.png"
    result = run_view(isbi_store, pred, half, "--slices", "29:30", "--screenshot", png)
    assert set(result["layers"].values()) == {"ok"}, result
    assert len(result["layers"]) == 6
    image = load_png(png)
    panels = {tuple(p["layers"]): p["rect"] for p in result["panels"]}
    assert central(image, panels[("raw",)]).std() > 20
    assert 0.3 < interior(central(image, panels[("raw", "neuron_interior")]), "label").mean() < 0.95
    background = np.array([128, 128, 128])
    for name in ("probability", "probability (half.zarr)"):
        shown = central(image, panels[(name,)])
        assert np.abs(shown - background).sum(axis=-1).mean() > 20, f"{name} not drawn"
    outside = run_view(isbi_store, pred, half, "--slices", "24:25", "--screenshot", tmp_path / "24.png")
    image = load_png(tmp_path / "24.png")
    panels = {tuple(p["layers"]): p["rect"] for p in outside["panels"]}
    for name in ("probability", "probability (half.zarr)"):
        assert central(image, panels[(name,)]).std() < 3, f"{name} of slices 25:30 drawn at slice 24"


# ------------------------------------------------------------------------ who reaches it


def other_addresses() -> list[str]:
    """Addresses of this machine other than 127.0.0.1: its own (hostname -I) and 127.0.0.2."""
    try:
        own = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        own = []
    return [a for a in own if ":" not in a and not a.startswith("127.")] + ["127.0.0.2"]


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=20)
    try:
        conn.request("GET", path)  # sent as is: no client-side normalisation of ../
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def test_only_token_holders_on_the_bound_address_reach_viewer_and_data(stores, free_port):
    need("neuroglancer")
    proc = subprocess.Popen([sys.executable, "-m", "unet_dist", "view", str(stores["store"]), str(stores["a"]),
                             "--port", str(free_port)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        hint = proc.stdout.readline().strip()
        match = re.fullmatch(rf"http://127\.0\.0\.1:{free_port}/v/([0-9a-f]{{40}})/", url)
        assert match, (url, proc.stderr.read() if proc.poll() is not None else "")
        token = match.group(1)
        assert f"ssh -N -L {free_port}:127.0.0.1:{free_port} " in hint

        # With the token: the client and the stores' files.
        status, body = get(free_port, f"/v/{token}/")
        assert status == 200 and b"<html" in body.lower()
        status, body = get(free_port, f"/zarr/{token}/0/zarr.json")
        assert status == 200 and json.loads(body)["attributes"]["ome"]["multiscales"][0]["name"] == "raw"
        status, body = get(free_port, f"/zarr/{token}/1/labels/mask/zarr.json")
        assert status == 200 and b"image-label" in body

        # Without it, or with another one: nothing.
        other = secrets.token_hex(20)
        for path in ("/", "/v/", f"/v/{other}/", f"/v/{other}/main.bundle.js", "/zarr/0/zarr.json",
                     f"/zarr/{other}/0/zarr.json", f"/zarr/{token[:-1]}/0/zarr.json",
                     f"/zarr/{token}/0/../../../../../etc/passwd", f"/zarr/{token}/2/zarr.json",
                     f"/events/{other}", f"/state/{other}"):
            status, body = get(free_port, path)
            assert status in (403, 404, 405), (path, status)
            assert b"multiscales" not in body and b"root:" not in body, path

        # On another address of this machine: no connection at all.
        for host in other_addresses():
            with pytest.raises(OSError):
                socket.create_connection((host, free_port), timeout=5).close()

        # The port is taken now: a second viewer on it is one line, exit 2.
        done = run_cli("view", stores["store"], "--port", free_port)
        assert done.code == 2 and done.err.count("\n") == 1 and f"{free_port}" in done.err, done.err
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mistakes_are_one_line(stores, tmp_path):
    need("neuroglancer")
    not_store = tmp_path / "folder"
    not_store.mkdir()
    for args, words in ((["view", not_store], "not a Zarr store"),
                        (["view", stores["store"], "--slices", "7:20"], "outside"),
                        (["view", stores["store"], "--slices", "x"], "--slices"),
                        (["view", stores["store"], "--port", "70000"], "--port")):
        done = run_cli(*args)
        assert done.code == 2 and done.err.count("\n") == 1 and words in done.err, (args, done.err)


# ----------------------------------------------------------------------- napari's reader


def napari_layers(path: Path) -> dict[str, tuple[str, int, list[float], list[float]]]:
    """What napari's OME-Zarr plugin makes of a store, from the reader it uses (ome-zarr-py):
    name -> (layer type, levels, scale, translate)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    layers = {}
    for node in Reader(parse_url(str(path)))():
        kinds = {type(spec) for spec in node.specs}
        if Multiscales not in kinds:
            continue
        transforms = {t["type"]: t[t["type"]] for t in node.metadata["coordinateTransformations"][0]}
        layers[node.metadata["name"]] = ("labels" if Label in kinds else "image", len(node.data),
                                         transforms["scale"], transforms.get("translation", [0.0, 0.0, 0.0]))
    return layers


def test_napari_reader_sees_image_and_labels_aligned(stores):
    assert napari_layers(stores["store"]) == {
        "raw": ("image", 2, [50.0, 4.0, 4.0], [0.0, 0.0, 0.0]),
        st.TARGET: ("labels", 2, [50.0, 4.0, 4.0], [0.0, 0.0, 0.0]),
    }
    assert napari_layers(stores["a"]) == {  # slices 2:6 start 100 nm down the raw's z
        "probability": ("image", 2, [50.0, 4.0, 4.0], [100.0, 0.0, 0.0]),
        "mask": ("labels", 2, [50.0, 4.0, 4.0], [100.0, 0.0, 0.0]),
    }
