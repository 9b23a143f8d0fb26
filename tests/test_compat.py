"""The private internals behind unet_dist/compat/: each is where its shim expects it on the installed
version, behaves as the shim relies on, and a version outside the tested range is refused or warned
about in one line. A failure here means a dependency moved an internal: update the shim and its range.
"""

from __future__ import annotations

import itertools
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from unet_dist import compat
from unet_dist.compat import dataloader, neuroglancer_server, torch_amp, zarr_internals
from unet_dist.errors import UserError

from helpers import ROOT, require

SHIMS = {"torch": [torch_amp, dataloader], "zarr": [zarr_internals], "neuroglancer": [neuroglancer_server]}
CHECKS = [torch_amp._problem, dataloader._problem, zarr_internals._problem]  # cached at first use


@pytest.fixture
def installed_as(monkeypatch):
    """`installed_as("torch", "2.99.0")`: the shims read that version from then on (their cached
    checks cleared then, and after the test)."""

    def pretend(distribution: str, version: str) -> None:
        real = compat.installed_version
        monkeypatch.setattr(compat, "installed_version", lambda d: version if d == distribution else real(d))
        for check in CHECKS:
            check.cache_clear()

    yield pretend
    monkeypatch.undo()
    for check in CHECKS:
        check.cache_clear()


def test_pyproject_bounds_are_the_tested_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for distribution, tested in compat.TESTED_RANGES.items():
        assert compat.requirement(distribution, tested) in requirements, distribution
    for distribution, shims in SHIMS.items():
        assert all(shim.TESTED == compat.TESTED_RANGES[distribution] for shim in shims)


@pytest.mark.parametrize("distribution", sorted(compat.TESTED_RANGES))
def test_the_installed_versions_are_the_tested_ones(distribution):
    if distribution == "neuroglancer" and compat.installed_version(distribution) is None:
        require("neuroglancer is not installed (pip install -e '.[view]')")
    assert compat.out_of_range(distribution, compat.TESTED_RANGES[distribution]) is None


def test_version_ranges_compare_release_numbers():
    assert compat._release("2.13.0+cpu") == (2, 13, 0) and compat._release("3.1.6") == (3, 1, 6)
    assert (2, 4) <= compat._release("2.10.1") < (2, 14)  # numerically, not as strings


# ---------------------------------------------------------------------------------- torch


def _fused_adam():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    model(torch.randn(3, 4)).sum().backward()
    return model, optimizer


@pytest.mark.parametrize("found_inf", [1.0, 0.0])
def test_a_fused_optimizer_takes_found_inf_as_gradscaler_feeds_it(found_inf):
    model, optimizer = _fused_adam()
    assert getattr(optimizer, torch_amp.SUPPORTS_SCALING) is True
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.found_inf, optimizer.grad_scale = torch.tensor(found_inf), None
    optimizer.step()
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    steps = [float(s["step"]) for s in optimizer.state.values()]
    assert (changed, steps) == (([False, False], [0.0, 0.0]) if found_inf else ([True, True], [1.0, 1.0]))


def test_an_untested_torch_skips_on_the_host_and_says_so(installed_as, capsys):
    installed_as("torch", "2.99.1")
    model, optimizer = _fused_adam()
    assert not torch_amp.skips_on_device(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    torch_amp.step_if_finite(optimizer, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not hasattr(optimizer, "found_inf")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch 2.99.1 is outside the tested range >=2.4,<2.14" in err


def _loader(workers: int):
    return torch.utils.data.DataLoader(torch.arange(8), batch_size=2, num_workers=workers,
                                       persistent_workers=workers > 0)


def test_stop_workers_ends_a_loaders_worker_processes_now():
    batches = iter(_loader(2))
    assert next(batches).tolist() == [0, 1]
    workers = list(batches._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    dataloader.stop_workers(batches)
    assert not any(w.is_alive() for w in workers)
    dataloader.stop_workers(iter(_loader(0)))  # no workers: nothing to stop, nothing said


def test_an_untested_torch_still_stops_the_workers_and_says_so(installed_as, capsys):
    installed_as("torch", "2.99.2")
    batches = iter(_loader(1))
    next(batches)
    workers = list(batches._workers)
    dataloader.stop_workers(batches)
    assert not any(w.is_alive() for w in workers)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch 2.99.2 is outside the tested range" in err and "untested" in err


# ---------------------------------------------------------------------------------- zarr


@pytest.mark.parametrize("grid", [(1,), (5,), (3, 5), (33, 2), (1, 1, 1), (1, 4, 4), (2, 4, 2), (3, 5, 7),
                                  (4, 4, 4), (5, 1, 7)])
def test_the_shard_chunk_order_is_zarrs(grid):
    order = zarr_internals.morton_order(grid)
    assert zarr_internals.zarrs_morton_order(grid) == order
    assert sorted(order) == list(itertools.product(*(range(n) for n in grid)))  # each chunk once


def test_zarrs_default_shard_index_codecs_are_the_ones_we_write():
    assert zarr_internals.default_index_codecs() == zarr_internals.INDEX_CODECS


def _local_arrays(folder: Path):
    from unet_dist.data.chunk_io import ChunkFiles
    from unet_dist.data.shard_io import ShardFiles

    root = zarr.open_group(LocalStore(folder), mode="w")
    blosc = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    plain = root.create_array("plain", shape=(3, 10, 10), chunks=(1, 4, 4), dtype="uint8", compressors=blosc)
    sharded = root.create_array("sharded", shape=(3, 10, 10), chunks=(1, 4, 4), shards=(1, 8, 8), dtype="uint8",
                                compressors=blosc)
    return ChunkFiles.of(plain), ShardFiles.of(sharded)


def test_an_untested_zarr_sends_every_chunk_through_zarr(installed_as, tmp_path, capsys):
    assert all(files is not None for files in _local_arrays(tmp_path / "tested.zarr"))
    installed_as("zarr", "3.9.0")
    assert _local_arrays(tmp_path / "untested.zarr") == (None, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zarr 3.9.0 is outside the tested range >=3.1,<3.2" in err


def test_a_moved_morton_order_sends_every_chunk_through_zarr(installed_as, monkeypatch):
    installed_as("zarr", zarr.__version__)  # in range: the order decides
    monkeypatch.setattr(zarr_internals, "zarrs_morton_order", lambda grid: None)
    assert "morton_order_iter" in zarr_internals._problem() and not zarr_internals.files_match_zarr()


# ---------------------------------------------------------------------------------- neuroglancer


@pytest.fixture
def neuroglancer():
    try:
        import neuroglancer
    except ImportError:
        require("neuroglancer is not installed (pip install -e '.[view]')")
    yield neuroglancer
    neuroglancer_server.stop()


def _get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read(), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, b"", {}


def test_neuroglancers_server_serves_a_folder_under_the_viewers_token(neuroglancer, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "0").write_bytes(b"chunk bytes")
    viewer = neuroglancer_server.start("127.0.0.1", 0)
    port, url = neuroglancer_server.serve_folders({rf"/zarr/{viewer.token}/0/(.*)": tmp_path})
    assert url.endswith(f":{port}") and viewer.get_viewer_url().startswith(url)
    status, body, headers = _get(f"{url}/zarr/{viewer.token}/0/c/0")
    assert (status, body) == (200, b"chunk bytes") and "Etag" not in headers  # no whole-file hash per request
    assert _get(f"{url}/zarr/{'0' * len(viewer.token)}/0/c/0")[0] == 404


def test_a_server_without_its_internals_is_refused_in_one_line(neuroglancer, monkeypatch):
    import neuroglancer.server

    neuroglancer_server.start("127.0.0.1", 0)
    monkeypatch.setattr(neuroglancer.server.global_server, "app", None)
    with pytest.raises(UserError, match=r"^neuroglancer \S+: its server has no app.*neuroglancer>=2.40,<2.42$"):
        neuroglancer_server.serve_folders({})


def test_an_untested_neuroglancer_is_named_in_one_line(neuroglancer, installed_as, capsys):
    installed_as("neuroglancer", "2.50.0")
    neuroglancer_server.start("127.0.0.1", 0)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neuroglancer 2.50.0 is outside the tested range >=2.40,<2.42" in err


def test_the_bundled_client_has_the_names_the_page_scripts_read(neuroglancer):
    client = Path(neuroglancer.__file__).parent / "static" / "client"
    bundle = "".join(p.read_text(errors="replace") for p in client.glob("main.*.js"))
    assert bundle, f"no main.*.js in {client}"
    missing = [name for name in neuroglancer_server.CLIENT_NAMES if name not in bundle]
    assert not missing
    scripts = neuroglancer_server.LAYER_STATUS_JS + neuroglancer_server.PANEL_RECTS_JS
    assert all(name.rstrip("=") in scripts for name in neuroglancer_server.CLIENT_NAMES)
