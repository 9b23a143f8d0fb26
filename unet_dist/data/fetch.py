"""`unet-dist fetch isbi2012`: the ISBI 2012 challenge files downloaded, checked and put in place.

The challenge's files come as one zip (ImageJ's download site mirrors it); only its three TIFFs are
kept, each checked against the SHA-256 this project records for it (`ISBI_2012`), so a changed or
damaged mirror is refused instead of trained on. The download is resumable: the part received so
far stays beside the target (`.download/NAME.part`) and the next run asks the server for the rest
(an HTTP Range request). Any failure is one line that says what to do, and no file is put in place
unless it checked out.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from unet_dist.errors import UserError
from unet_dist.monitor.progress import Progress

ISBI_URL = "https://downloads.imagej.net/ISBI-2012-challenge.zip"
# The three TIFFs as the challenge distributes them (30 x 512 x 512, uint8, uncompressed pages).
ISBI_2012 = {
    "train-volume.tif": "a05df637d576b2387966b7323a34e90e2cdbf86dcaeee86c44d1fd2d616be489",
    "train-labels.tif": "9a9f1056ffd8bac61060b58dc84ad40295c02fc5ff15e68ddfc2f12d211c3dcf",
    "test-volume.tif": "046fbb869a953f1ffa63a9722849fe0aa693ad7a21aa9278a2bff2397d00b16f",
}
CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def read_checksums(path) -> dict[str, str]:
    """A `sha256sum` file (`HEX  NAME` lines) instead of the recorded checksums, for another copy of the data."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read checksums ({exc.strerror or exc})") from None
    sums = {}
    for line in filter(str.strip, lines):
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise UserError(f"{path}: expected lines 'SHA256  NAME', got '{line.strip()[:80]}'")
        sums[Path(parts[1].lstrip("*")).name] = parts[0].lower()
    return sums


def fetch_isbi2012(folder, url: str = ISBI_URL, checksums: dict[str, str] | None = None) -> list[Path]:
    """Put the ISBI 2012 TIFFs in `folder` (downloading `url` unless they are there and check out);
    returns their paths."""
    folder, sums = Path(folder), checksums or ISBI_2012
    targets = [folder / name for name in sums]
    if all(p.is_file() and sha256_of(p) == sums[p.name] for p in targets):
        print(f"ISBI 2012 files already in {folder} (SHA-256 checked)", flush=True)
        return targets
    try:
        folder.mkdir(parents=True, exist_ok=True)
        archive = _download(url, folder / ".download")
        _extract_checked(archive, url, folder, sums)
    except OSError as exc:
        raise UserError(f"{exc.filename or folder}: cannot write ({exc.strerror or exc})") from None
    shutil.rmtree(folder / ".download", ignore_errors=True)
    print(f"ISBI 2012 in {folder}: {', '.join(sums)} (SHA-256 checked)", flush=True)
    return targets


def _download(url: str, workdir: Path) -> Path:
    """The file at `url` in `workdir`, continuing a part left by an earlier run."""
    workdir.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlsplit(url).path).name or "download"
    done, part = workdir / name, workdir / f"{name}.part"
    if done.is_file():
        return done
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is already whole
            part.rename(done)
            return done
        raise UserError(f"{url}: the server answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"{url}: cannot download ({reason}); without the network, put the files in the "
                        "folder by hand") from None
    with response:
        if have and response.status != 206:  # the server ignores ranges: start again
            have = 0
        total = have + int(response.headers.get("Content-Length") or 0)
        _receive(response, part, have, total, url)
    part.rename(done)
    return done


def _receive(response, part: Path, have: int, total: int, url: str) -> None:
    progress = Progress(f"fetch {Path(part.name).stem}", max(1, total), "bytes", unit_bytes=1, start=have)
    with open(part, "ab" if have else "wb") as out:
        got = have
        while True:
            try:
                block = response.read(CHUNK)
            except (OSError, urllib.error.URLError) as exc:
                block, error = b"", exc
            else:
                error = None
            if block:
                out.write(block)
                got += len(block)
                progress.update(got)
            if not block:
                break
    if error is not None or (total and got < total):
        raise UserError(f"{url}: the download stopped at {got} of {total or '?'} bytes ({part} kept); run the "
                        "same command again to resume it")


def _extract_checked(archive: Path, url: str, folder: Path, sums: dict[str, str]) -> None:
    """Each wanted file from the zip into a temporary name, checked, then renamed into place."""
    try:
        members = {Path(m).name: m for m in zipfile.ZipFile(archive).namelist()}
    except zipfile.BadZipFile:
        archive.unlink(missing_ok=True)
        raise UserError(f"{url}: not a zip archive (removed); check the URL, or run again") from None
    missing = [name for name in sums if name not in members]
    if missing:
        raise UserError(f"{url}: the archive lacks {', '.join(missing)}")
    checked = []
    with zipfile.ZipFile(archive) as zf:
        for name, expected in sums.items():
            tmp = folder / f".{name}.part"
            with zf.open(members[name]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            got = sha256_of(tmp)
            if got != expected:
                for path in (tmp, *checked, archive):
                    path.unlink(missing_ok=True)
                raise UserError(f"{url}: {name} has SHA-256 {got}, not the recorded {expected}; nothing was "
                                "kept (a changed or damaged mirror)")
            checked.append(tmp)
    for tmp in checked:
        os.replace(tmp, folder / tmp.name[1:-len(".part")])
