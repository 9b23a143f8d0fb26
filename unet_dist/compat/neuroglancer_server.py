"""neuroglancer's web server and client internals that `unet-dist view` relies on.

The stores' files are served by neuroglancer's own tornado server (visualize/view.py says why):
routes added to `neuroglancer.server.global_server.app`, whose `port` and `server_url` give the
addresses. In the page, the layers' load states and the panels' places are read from the client's
objects (`window.viewer.layerManager`, a layer's `dataSources` and `loadState`) and its CSS class
for a 2D panel. None of it is public API, so the installed version is checked against the tested
range at first use (outside: a warning, as the screenshot's layer check still fails loudly), and a
server without those attributes is refused in one line.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from unet_dist.compat import TESTED_RANGES, installed_version, out_of_range, requirement
from unet_dist.errors import UserError, warn_once

TESTED = TESTED_RANGES["neuroglancer"]

# In the page: each layer's name and the state of its data sources ("ok", "loading", "error: ...").
LAYER_STATUS_JS = """() => window.viewer.layerManager.managedLayers.map(m => ({
  name: m.name,
  sources: m.layer ? m.layer.dataSources.map(d => {
    const s = d.loadState;
    return s === undefined ? 'loading' : (s.error !== undefined ? 'error: ' + s.error.message : 'ok');
  }) : ['no layer'],
  shaderError: (m.layer && m.layer.shaderError && m.layer.shaderError.value) ? String(m.layer.shaderError.value.message || m.layer.shaderError.value) : null,
}))"""

PANEL_CLASS = "neuroglancer-rendered-data-panel"
# In the page: where each 2D panel is (x, y, width, height in CSS pixels = PNG pixels), in DOM order.
PANEL_RECTS_JS = f"""() => Array.from(document.querySelectorAll('.{PANEL_CLASS}')).map(e => {{
  const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }})"""

# The client's names the scripts above use (tests/test_compat.py finds each in the bundled client;
# the viewer is the global the client's main script assigns).
CLIENT_NAMES = ("window.viewer=", "layerManager", "managedLayers", "dataSources", "loadState", "shaderError",
                PANEL_CLASS)


def start(bind: str, port: int):
    """neuroglancer's server (restarted) on `bind`:`port` with a new viewer; the viewer."""
    import neuroglancer
    import neuroglancer.server

    problem = out_of_range("neuroglancer", TESTED)
    if problem is not None:
        warn_once(f"{problem}: `unet-dist view` uses its server's internals and may fail")
    logging.getLogger("tornado.access").setLevel(logging.ERROR)  # no line per 404
    if neuroglancer.server.is_server_running():
        neuroglancer.server.stop()
    neuroglancer.set_server_bind_address(bind, port)
    try:
        return neuroglancer.Viewer()
    except OSError as exc:
        raise UserError(f"cannot serve on {bind}:{port} ({exc.strerror or exc}); "
                        "choose another --port (0: any free one) or --bind") from None


def serve_folders(routes: dict[str, Path]) -> tuple[int, str]:
    """Serve each folder's files under its URL pattern (one group: the path inside the folder) on
    the running server; the server's (port, URL)."""
    import neuroglancer.server

    server = neuroglancer.server.global_server
    app = getattr(server, "app", None)
    if not (hasattr(app, "add_handlers") and hasattr(server, "port") and hasattr(server, "server_url")):
        raise UserError(f"neuroglancer {installed_version('neuroglancer')}: its server has no app, port or "
                        f"server_url to serve the stores from; install {requirement('neuroglancer', TESTED)}")
    app.add_handlers(r".*", [(pattern, _store_files(), dict(path=str(folder))) for pattern, folder in routes.items()])
    return server.port, server.server_url


def stop() -> None:
    import neuroglancer.server

    neuroglancer.server.stop()


@functools.cache
def _store_files():
    """tornado's StaticFileHandler for a store's files, without ETags: tornado would hash a whole
    (shard) file for every range request to make one."""
    import tornado.web

    class StoreFiles(tornado.web.StaticFileHandler):
        def compute_etag(self):
            return None

    return StoreFiles
