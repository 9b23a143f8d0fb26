"""`unet-dist fetch isbi2012` against a local HTTP mirror on 127.0.0.1 (no internet in tests): a
stand-in of the challenge's zip with the right names and its own checksums; a checksum mismatch, a
download cut short and its resume, each one line; and `make demo`'s script taking the real-data path
through it."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from helpers import ENV, ROOT, SMOKE, run_cli

NAMES = ("train-volume.tif", "train-labels.tif", "test-volume.tif")


def stand_in_zip(seed: int = 0) -> tuple[bytes, dict[str, bytes]]:
    """The challenge's zip in small: 30 slices of 64 x 64, labels 0/255, in a folder as the real one."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (30, 64, 64), dtype=np.uint8)
    labels = np.where(raw > 60, 255, 0).astype(np.uint8)  # dark = membrane, as EM shows it
    files = {}
    for name, data in zip(NAMES, (raw, labels, raw[::-1].copy())):
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, data)
        files[name] = buffer.getvalue()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"ISBI-2012-challenge/{name}", data)
    return archive.getvalue(), files


class Mirror:
    """A one-file HTTP server with Range requests; `cut_after` bytes, once, then the connection drops."""

    def __init__(self, body: bytes):
        self.body, self.cut_after, self.ranges = body, None, []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.split("=")[1].split("-")[0])
                mirror.ranges.append(start)
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(mirror.body) - start))
                self.end_headers()
                data = mirror.body[start:]
                if mirror.cut_after is not None:
                    data, mirror.cut_after = data[:mirror.cut_after], None
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ISBI-2012-challenge.zip"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror():
    body, files = stand_in_zip()
    served = Mirror(body)
    served.files = files
    yield served
    served.close()


def one_error(done) -> str:
    """The run's one `error:` line (progress lines may stand before it on stderr)."""
    errors = [line for line in done.err.splitlines() if line.startswith("error:")]
    assert done.code == 2 and len(errors) == 1 and "Traceback" not in done.err, done.err
    return errors[0]


def checksums(tmp_path: Path, files: dict[str, bytes], wrong: str | None = None) -> Path:
    path = tmp_path / "SHA256SUMS"
    path.write_text("".join(f"{'0' * 64 if name == wrong else hashlib.sha256(data).hexdigest()}  {name}\n"
                            for name, data in files.items()))
    return path


def test_fetch_checks_and_places_the_files(mirror, tmp_path):
    out = tmp_path / "isbi"
    done = run_cli("fetch", "isbi2012", "--dir", out, "--url", mirror.url, "--checksums",
                   checksums(tmp_path, mirror.files))
    assert done.code == 0, done.err
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)  # no download folder or parts left
    for name, data in mirror.files.items():
        assert (out / name).read_bytes() == data
    again = run_cli("fetch", "isbi2012", "--dir", out, "--url", mirror.url, "--checksums",
                    checksums(tmp_path, mirror.files))
    assert again.code == 0 and "already in" in again.out and mirror.ranges == [0]  # nothing fetched again


def test_a_checksum_mismatch_is_one_line_and_keeps_nothing(mirror, tmp_path):
    out = tmp_path / "isbi"
    done = run_cli("fetch", "isbi2012", "--dir", out, "--url", mirror.url, "--checksums",
                   checksums(tmp_path, mirror.files, wrong="train-labels.tif"))
    error = one_error(done)
    assert "train-labels.tif has SHA-256" in error and "not the recorded" in error
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_the_recorded_checksums_refuse_a_stand_in(mirror, tmp_path):
    done = run_cli("fetch", "isbi2012", "--dir", tmp_path / "isbi", "--url", mirror.url)
    assert "not the recorded" in one_error(done)


def test_a_download_cut_short_is_one_line_and_the_next_run_resumes_it(mirror, tmp_path):
    out, sums = tmp_path / "isbi", checksums(tmp_path, mirror.files)
    mirror.cut_after = len(mirror.body) // 3
    cut = run_cli("fetch", "isbi2012", "--dir", out, "--url", mirror.url, "--checksums", sums)
    error = one_error(cut)
    assert f"stopped at {len(mirror.body) // 3} of {len(mirror.body)} bytes" in error and "resume" in error
    assert not (out / "train-volume.tif").exists()
    resumed = run_cli("fetch", "isbi2012", "--dir", out, "--url", mirror.url, "--checksums", sums)
    assert resumed.code == 0, resumed.err
    assert mirror.ranges == [0, len(mirror.body) // 3]  # the second request asked for the rest only
    assert all((out / name).read_bytes() == data for name, data in mirror.files.items())


def test_no_network_is_one_line(tmp_path):
    done = run_cli("fetch", "isbi2012", "--dir", tmp_path / "isbi", "--url", "http://127.0.0.1:9/x.zip")
    assert "cannot download" in one_error(done)


@pytest.mark.slow
def test_make_demos_script_fetches_the_real_data_when_it_is_missing(mirror, tmp_path):
    """scripts/demo.sh (what `make demo` runs) with the ISBI folder empty: it fetches the files from
    the mirror and converts them, instead of falling back to the synthetic volume."""
    config = tmp_path / "demo.yaml"
    config.write_text(SMOKE.read_text().replace("steps: 40", "steps: 4").replace("val_every: 20", "val_every: 4")
                      .replace("ckpt_every: 20", "ckpt_every: 4"))
    env = {**ENV, "UNET_DIST_ISBI_DIR": str(tmp_path / "isbi"), "UNET_DIST_ISBI_URL": mirror.url,
           "UNET_DIST_ISBI_CHECKSUMS": str(checksums(tmp_path, mirror.files)), "DEMO_CONFIG": str(config),
           "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}", "WANDB_MODE": "disabled"}
    done = subprocess.run(["bash", "scripts/demo.sh", str(tmp_path / "demo")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "== convert: ISBI 2012 from" in done.stdout and "NOT the real data" not in done.stdout
    assert (tmp_path / "demo" / "isbi2012.zarr").is_dir() and (tmp_path / "demo" / "evaluation.json").is_file()
    evaluation = json.loads((tmp_path / "demo" / "evaluation.json").read_text())  # the segment step ran
    assert 0 <= evaluation["v_rand_neurons"] <= 1 and 0 <= evaluation["v_info_neurons"] <= 1
