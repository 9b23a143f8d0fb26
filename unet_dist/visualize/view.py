"""`unet-dist view`: raw, label images, probability and mask of stores in neuroglancer.

How the data reaches the browser: the stores' own files, served over HTTP by the `neuroglancer`
package's web server (which also serves the viewer's client, bundled in the package: no internet
needed). Each store is a route `/zarr/<token>/<i>/...` added to that server (through
compat/neuroglancer_server.py, as the server's internals are not public API), and each layer's
source is `zarr3://http://HOST:PORT/zarr/<token>/<i>/` (or `.../labels/<name>/`), which the client
reads as OME-Zarr 0.5. Chosen over `LocalVolume` (arrays served from Python) because the client
then uses every pyramid level of the store (a zoomed-out view of a large volume fetches the coarse
level, nothing is downsampled on the fly), places each image by its OME scale and translation (a
prediction of slices 25:30 lands on slices 25-29 of the raw, in nm), and reads shards with range
requests; Python only hands out files. Exception: the client has no float16, so a float16
probability is served as a `LocalVolume` (tensorstore, cast to float32; one level, downsampled by
neuroglancer on the fly).

Who can reach it: the server binds to 127.0.0.1 unless `bind` says otherwise, and every route that
gives the client or data carries neuroglancer's random viewer token (160 bits from os.urandom); a
request without it gets 404. From a cluster login node, `ssh -L` brings the port to one's own
machine (printed with the URL).

`--screenshot OUT.png` opens the URL in headless Chromium (Playwright driving a system Chromium,
WebGL in software through SwiftShader), waits until neuroglancer says every visible chunk is drawn
(its screenshot request waits for that), checks in the page that every layer's data source loaded,
and writes the page (panels with their layer names) as PNG.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unet_dist.compat import neuroglancer_server
from unet_dist.data.ome_metadata import read_multiscale
from unet_dist.data.store import label_names, open_store
from unet_dist.errors import UserError

BROWSER_ENV = "UNET_DIST_CHROMIUM"  # path of a Chromium binary for --screenshot
SCREENSHOT_SIZE = (1280, 1040)
ROUTE = "zarr"

# A viridis ramp (polynomial fit, max error < 1%), so p = 0 is dark blue and p = 1 yellow.
PROBABILITY_SHADER = """#uicontrol invlerp p(range=[0, {top}], clamp=true)
vec3 viridis(float t) {{
  const vec3 c0 = vec3(0.2777273272234177, 0.005407344544966578, 0.3340998053353061);
  const vec3 c1 = vec3(0.1050930431085774, 1.404613529898575, 1.384590162594685);
  const vec3 c2 = vec3(-0.3308618287255563, 0.214847559468213, 0.09509516302823659);
  const vec3 c3 = vec3(-4.634230498983486, -5.799100973351585, -19.33244095627987);
  const vec3 c4 = vec3(6.228269936347081, 14.17993336680509, 56.69055260068105);
  const vec3 c5 = vec3(4.776384997670288, -13.74514537774601, -65.35303263337234);
  const vec3 c6 = vec3(-5.435455855934631, 4.645852612178535, 26.3124352495832);
  return c0 + t * (c1 + t * (c2 + t * (c3 + t * (c4 + t * (c5 + t * c6)))));
}}
void main() {{ emitRGB(viridis(p())); }}
"""
GREY_SHADER = """#uicontrol invlerp normalized(range=[{lo}, {hi}])
void main() {{ emitGrayscale(normalized()); }}
"""
# Affinities: the first three channels (z, y, x for the default offsets) as red, green, blue, so a
# neuron's interior is white and the boundary dark, coloured by the axis it cuts.
AFFINITY_SHADER = """void main() {{ emitRGB(vec3({rgb})); }}
"""
CHANNEL = "c^"  # the channel axis as neuroglancer's channel dimension: getDataValue(i) reads channel i

@dataclass
class Store:
    """What one store shows: its image (raw or probability) and its label images."""

    path: Path
    image: str  # the OME multiscale name: "raw", "probability", ...
    dtype: np.dtype
    shape: tuple[int, ...]
    voxel_size: tuple[float, ...] | None
    z0: int  # first slice, in the store's voxels, from the OME translation
    labels: dict[str, list[dict]] = field(default_factory=dict)  # name -> image-label colors
    contrast: tuple[float, float] = (0.0, 255.0)
    channels: int = 0  # an affinity prediction's channels (axis c before z, y, x); 0: none

    @property
    def is_probability(self) -> bool:
        return self.image == "probability" or self.channels > 0


def inspect(path) -> Store:
    """A unet-dist / OME-Zarr store's image and label images; UserError for anything else."""
    path = Path(path)
    group = open_store(path)
    multiscale = read_multiscale(group.attrs)
    if multiscale is None:
        raise UserError(f"{path}: no OME-Zarr multiscales metadata; not a unet-dist store")
    shape = tuple(group["0"].shape)
    channels = shape[0] if len(shape) == 4 and multiscale.axes[0].type == "channel" else 0
    if len(shape) - bool(channels) != 3:
        raise UserError(f"{path}: image has {len(shape)} axes; expected z, y, x (or c, z, y, x)")
    vs = multiscale.voxel_size(0)
    translation = [t for t, axis in zip(multiscale.levels[0].translation, multiscale.axes) if axis.is_space]
    z0 = int(round(translation[0] / vs[0])) if vs else int(round(translation[0]))
    labels = {}
    for name in label_names(group):
        attrs = group["labels"][name].attrs.get("ome", {})
        labels[name] = attrs.get("image-label", {}).get("colors", [])
    coarsest = group[multiscale.paths[-1]]
    if channels:
        return Store(path, multiscale.name or path.stem, np.dtype(group["0"].dtype), shape[1:], vs, z0, labels,
                     channels=channels)
    return Store(path, multiscale.name or path.stem, np.dtype(group["0"].dtype), shape, vs, z0, labels,
                 _contrast(coarsest))


def _contrast(array) -> tuple[float, float]:
    """A grey range from the middle slice of the coarsest level (0.1 and 99.9 percentiles)."""
    sample = np.asarray(array[array.shape[0] // 2], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, [0.1, 99.9]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


@dataclass
class Plan:
    """Layers (name -> neuroglancer layer) and panels (layer names shown together)."""

    layers: dict
    panels: list[list[str]]
    position: list[float]
    dimensions: object


def plan(stores: list[Store], base_url: str, slices: tuple[int, int] | None = None,
         local_volume=None) -> Plan:
    """The viewer's layers, panels and start position for `stores` (the first one sets the grid)."""
    import neuroglancer

    first = stores[0]
    depth = first.shape[0]
    if slices is not None and not first.z0 <= slices[0] < slices[1] <= first.z0 + depth:
        raise UserError(f"--slices {slices[0]}:{slices[1]}: outside {first.path}'s slices "
                        f"{first.z0}:{first.z0 + depth}")
    if slices is not None:
        z = slices[0]
    else:  # the first prediction's first slice, else the middle of the first store
        z = next((s.z0 for s in stores[1:] if s.is_probability), first.z0 + depth // 2)
    names: set[str] = set()

    def unique(name: str, store: Store) -> str:
        name = name if name not in names else f"{name} ({store.path.name})"
        names.add(name)
        return name

    layers: dict = {}
    panels: list[list[str]] = []
    raw: list[str] = []
    for i, store in enumerate(stores):
        url = f"zarr3://{base_url}/{i}/"
        image = unique(store.image, store)
        if store.channels:
            source = url if store.dtype != np.float16 else local_volume(store)
            layers[image] = neuroglancer.ImageLayer(source=_channel_source(source, store),
                                                    shader=_affinity_shader(store))
        elif store.is_probability:
            top = 255 if store.dtype == np.uint8 else 1
            source = url if store.dtype != np.float16 else local_volume(store)
            layers[image] = neuroglancer.ImageLayer(source=source, shader=PROBABILITY_SHADER.format(top=top))
        else:
            lo, hi = store.contrast
            layers[image] = neuroglancer.ImageLayer(source=url, shader=GREY_SHADER.format(lo=lo, hi=hi))
        if i == 0 and not store.is_probability:
            raw = [image]
        overlays = []
        for label, colors in store.labels.items():
            name = unique(label, store)
            layers[name] = _segmentation(f"{url}labels/{label}/", colors)
            overlays.append(name)
        panels.append([image])
        if overlays:  # label images over the raw (the first store's image, when it is one)
            panels.append([*raw, *overlays])
    vs = first.voxel_size
    dimensions = neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="nm" if vs else "",
                                              scales=list(vs) if vs else [1, 1, 1])
    # OME coordinates are voxel centres (neuroglancer draws voxel i of a level over i +- 0.5 of its
    # scale): slice z is at z, not z + 0.5.
    return Plan(layers, panels, [float(z), first.shape[1] / 2, first.shape[2] / 2], dimensions)


def _space(store: Store, channels: bool):
    import neuroglancer

    vs = store.voxel_size
    return neuroglancer.CoordinateSpace(names=[CHANNEL] * channels + ["z", "y", "x"],
                                        units=[""] * channels + ["nm" if vs else ""] * 3,
                                        scales=[1] * channels + list(vs or (1, 1, 1)))


def _channel_source(source, store: Store):
    """The c axis (OME type channel, which neuroglancer makes a per-layer slider c') as a channel
    dimension, so the shader sees every channel of a voxel at once."""
    import neuroglancer

    if not isinstance(source, str):  # a LocalVolume names its dimensions itself
        return source
    return neuroglancer.LayerDataSource(url=source, transform=neuroglancer.CoordinateSpaceTransform(
        output_dimensions=_space(store, channels=True)))


def _affinity_shader(store: Store) -> str:
    # toNormalized: uint8 / 255, a float (float16 served as float32) as it is
    return AFFINITY_SHADER.format(rgb=", ".join(f"toNormalized(getDataValue({c}))" if c < store.channels else "0.0"
                                                for c in range(3)))


def _segmentation(source: str, colors: list[dict]):
    """A label image as a segmentation layer coloured as its OME `colors` say (alpha 0: hidden)."""
    import neuroglancer

    shown = {int(c["label-value"]): c["rgba"] for c in colors if len(c.get("rgba", [])) == 4 and c["rgba"][3] > 0}
    if not shown:  # no colours given: every nonzero label in neuroglancer's own colours
        return neuroglancer.SegmentationLayer(source=source)
    alpha = max(rgba[3] for rgba in shown.values()) / 255
    return neuroglancer.SegmentationLayer(
        source=source, segments=sorted(shown), selected_alpha=alpha,
        segment_colors={v: "#{:02x}{:02x}{:02x}".format(*rgba[:3]) for v, rgba in shown.items()})


def _layout(panels: list[list[str]]):
    import neuroglancer

    def panel(names):
        return neuroglancer.LayerGroupViewer(layers=names, layout="xy")

    rows = [neuroglancer.row_layout([panel(p) for p in panels[i:i + 2]]) for i in range(0, len(panels), 2)]
    return rows[0] if len(rows) == 1 else neuroglancer.column_layout(rows)


def _panel_side(size, panels: int) -> float:
    """About the side of one panel in a window of `size` (rows of two; bars above and in each)."""
    rows = -(-panels // 2)
    return max(50.0, min(size[0] / (2 if panels > 1 else 1) - 10, (size[1] - 50) / rows - 35))


class Session:
    """The neuroglancer server with the stores' routes and one viewer; `close()` stops it."""

    def __init__(self, stores: list[Store], bind: str = "127.0.0.1", port: int = 0,
                 slices: tuple[int, int] | None = None, size=SCREENSHOT_SIZE, crosshair: bool = True):
        _need("neuroglancer")
        self.viewer = neuroglancer_server.start(bind, port)
        self.token = self.viewer.token
        self.port, server_url = neuroglancer_server.serve_folders(
            {rf"/{ROUTE}/{self.token}/{i}/(.*)": s.path.resolve() for i, s in enumerate(stores)})
        self.bind = bind
        self.url = self.viewer.get_viewer_url()
        base = f"{server_url}/{ROUTE}/{self.token}"
        self.plan = plan(stores, base, slices, self._local_volume)
        first = stores[0]
        with self.viewer.txn() as s:
            s.dimensions = self.plan.dimensions
            s.display_dimensions = ["x", "y", "z"]
            s.position = self.plan.position
            s.cross_section_scale = max(first.shape[1:]) / (0.9 * _panel_side(size, len(self.plan.panels)))
            s.show_default_annotations = False
            s.show_axis_lines = crosshair
            for name, layer in self.plan.layers.items():
                s.layers[name] = layer
            s.layout = _layout(self.plan.panels)

    def _local_volume(self, store: Store):
        """A float16 image as float32 from Python (the client reads no float16)."""
        import neuroglancer
        import tensorstore as ts

        array = ts.open({"driver": "zarr3", "kvstore": f"file://{store.path.resolve()}/0"}, read=True).result()
        lead = [0] if store.channels else []
        return neuroglancer.LocalVolume(ts.cast(array, ts.float32), dimensions=_space(store, bool(store.channels)),
                                        voxel_offset=[*lead, store.z0, 0, 0], volume_type="image")

    def tunnel_hint(self) -> str:
        host = socket.getfqdn()
        target = "127.0.0.1" if self.bind in ("127.0.0.1", "localhost", "0.0.0.0", "::") else self.bind
        return (f"from your own machine: ssh -N -L {self.port}:{target}:{self.port} {getpass.getuser()}@{host}\n"
                f"then open the URL above there (keep the port {self.port} on both ends: the page's data "
                "addresses contain it)")

    def close(self) -> None:
        neuroglancer_server.stop()


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"unet-dist view needs the '{module}' package: pip install 'unet-dist[view]'") from None


def find_chromium() -> str:
    """The Chromium binary for --screenshot: $UNET_DIST_CHROMIUM, else one on PATH."""
    env = os.environ.get(BROWSER_ENV)
    if env:
        if not os.access(env, os.X_OK):
            raise UserError(f"${BROWSER_ENV}={env}: not an executable")
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise UserError("--screenshot needs Chromium: install it (Debian/Ubuntu: apt-get install chromium) "
                    f"or point ${BROWSER_ENV} at one")


def screenshot(session: Session, out, size=SCREENSHOT_SIZE, timeout: float = 180.0) -> dict:
    """Render the viewer in headless Chromium, wait for the data, write OUT (PNG); layer states."""
    _need("playwright")
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create its folder ({exc.strerror})") from None
    args = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    width, height = size
    errors: list[str] = []
    chromium = find_chromium()
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=chromium, args=args, headless=True)
        except PlaywrightError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--screenshot: cannot start Chromium ({chromium}): {first}") from None
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(session.url)
            _wait_drawn(session.viewer, timeout)
            # the client's internals, kept with the server's in one shim
            status = {layer["name"]: layer for layer in page.evaluate(neuroglancer_server.LAYER_STATUS_JS)}
            rects = page.evaluate(neuroglancer_server.PANEL_RECTS_JS)
            page.screenshot(path=str(out))
        finally:
            browser.close()
    # Panels in layout order (rows of two, left to right), with their place in the PNG.
    panels = [{"layers": names, "rect": rect} for names, rect in zip(session.plan.panels, rects)]
    result = {"screenshot": str(out), "layers": {}, "panels": panels, "page_errors": errors}
    for name in session.plan.layers:
        layer = status.get(name)
        if layer is None:
            state = "missing (its source failed and neuroglancer dropped it)"
        else:
            bad = [s for s in layer["sources"] if s != "ok"]
            state = bad[0] if bad else ("shader error: " + layer["shaderError"] if layer["shaderError"] else "ok")
        result["layers"][name] = state
    return result


def _wait_drawn(viewer, timeout: float) -> None:
    """Block until neuroglancer has drawn every visible chunk (its screenshot request waits for it)."""
    done = threading.Event()
    viewer.async_screenshot(lambda reply: done.set())
    if not done.wait(timeout):
        raise UserError(f"--screenshot: the viewer did not finish drawing within {timeout:.0f} s")


def view(stores, slices: tuple[int, int] | None = None, port: int = 0, bind: str = "127.0.0.1",
         screenshot_out=None, size=SCREENSHOT_SIZE, timeout: float = 180.0, wait=None, echo=print) -> dict:
    """Serve `stores` in neuroglancer; with `screenshot_out` render it headless and return, else
    print the URL and serve until `wait()` returns (default: forever, i.e. until Ctrl-C)."""
    if not stores:
        raise UserError("view: give at least one store")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected 0..65535")
    infos = [inspect(s) for s in stores]
    session = Session(infos, bind=bind, port=port, slices=slices, size=size, crosshair=screenshot_out is None)
    try:
        if screenshot_out is not None:
            result = screenshot(session, screenshot_out, size, timeout)
            failed = {n: s for n, s in result["layers"].items() if s != "ok"}
            if failed:
                raise UserError("layers did not load: " + "; ".join(f"{n}: {s}" for n, s in failed.items())
                                + f" (screenshot written to {screenshot_out})")
            return result
        echo(session.url, flush=True)
        echo(session.tunnel_hint(), flush=True)
        echo("serving until Ctrl-C", flush=True)
        (wait or threading.Event().wait)()
        return {"url": session.url}
    finally:
        session.close()
