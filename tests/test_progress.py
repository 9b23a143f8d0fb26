"""Progress lines of long work: rate and ETA, bars on terminals, sparse plain lines in logs."""

from __future__ import annotations

import io

from unet_dist.monitor.progress import Progress

from helpers import run_cli


def test_plain_lines_carry_rate_and_eta_and_stay_sparse():
    out = io.StringIO()
    progress = Progress("predict", 4, "blocks", unit_bytes=1_000_000, mode="plain", every_s=0, stream=out)
    for done in range(1, 5):
        progress.update(done)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("predict: 1/4 blocks")
    assert all(" blocks/s" in line and " MB/s" in line for line in lines)
    assert all("eta " in line for line in lines[:3]) and "elapsed " in lines[3]

    sparse = io.StringIO()
    progress = Progress("convert", 100, "slices", mode="plain", every_s=3600, stream=sparse)
    for done in range(1, 101):
        progress(done, 100)
    assert [line.split("  ")[0] for line in sparse.getvalue().splitlines()] == [
        "convert: 1/100 slices", "convert: 100/100 slices"]  # the first, then the last


def test_bar_redraws_in_place_and_ends_the_line():
    out = io.StringIO()
    progress = Progress("synth", 3, "slices", mode="bar", stream=out)
    for done in range(1, 4):
        progress.update(done)
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "[########################] synth: 3/3 slices" in text


def test_synth_on_the_command_line_reports_rate(tmp_path):
    done = run_cli("synth", "--out", tmp_path / "s.zarr", "--shape", "3,64,64")
    assert done.code == 0, done.err
    assert "synth: 3/3 slices" in done.err and "slices/s" in done.err and "elapsed" in done.err
