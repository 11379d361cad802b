"""Fetching the official dataset files: resumable, retried, md5-checked downloads and a safe tar extraction."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# Official download locations (tried in order) and md5s. Module-level so tests can point them at a local server.
MIRRORS: dict[str, list[str]] = {
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
}
ARCHIVES: dict[str, dict[str, str]] = {
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "cifar100": {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}
RETRY_BACKOFF_S = 1.0  # seconds before retry k is k * RETRY_BACKOFF_S


class _ShortRead(OSError):
    """The connection ended before Content-Length bytes arrived."""


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, *, retries: int = 3, timeout: float = 30,
             progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` and check its md5; return ``dest``.

    Bytes go to ``dest + '.part'``; an interrupted download resumes from there with an HTTP Range request (from
    byte 0 when the server ignores Range). Only a complete file whose md5 matches is renamed to ``dest``, so a
    file under the final name is always whole. Connection errors are retried ``retries`` times with a short
    backoff. An existing ``dest`` with the right md5 returns at once.
    """
    dest = Path(dest)
    if dest.is_file():
        if file_md5(dest) == md5:
            return dest
        dest.unlink()  # stale or corrupt: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(RETRY_BACKOFF_S * attempt)
        try:
            _fetch_into(url, part, timeout, progress)
            break
        except urllib.error.HTTPError as error:
            if error.code == 416:  # the part file is not a prefix of what the server has: start over
                part.unlink(missing_ok=True)
            elif error.code < 500:
                raise OSError(f"{url}: HTTP {error.code} {error.reason}") from None
            last_error: Exception = error
        except (OSError, http.client.HTTPException) as error:  # URLError, reset, timeout, short or bad response
            last_error = error
    else:
        raise OSError(f"{url}: download failed after {retries + 1} attempts: {last_error}")
    actual = file_md5(part)
    if actual != md5:
        part.unlink()
        raise ValueError(f"{url}: md5 mismatch: expected {md5}, got {actual}; the partial file was deleted")
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (all of it when the server does not honour Range), fsynced."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        if offset and response.status != 206:
            offset = 0
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = offset + remaining if remaining is not None else None
        received, shown = 0, -1
        with open(part, "ab" if offset else "wb") as file:
            while chunk := response.read(1 << 16):
                file.write(chunk)
                received += len(chunk)
                if progress and total:
                    percent = 100 * (offset + received) // total
                    if percent != shown:
                        shown = percent
                        print(f"\r{url.rsplit('/', 1)[-1]}: {percent}% of {total / 1e6:.1f} MB", end="",
                              file=sys.stderr, flush=True)
            file.flush()
            os.fsync(file.fileno())
        if progress and total:
            print(file=sys.stderr)
        if remaining is not None and received < remaining:
            raise _ShortRead(f"{url}: connection closed after {offset + received} of {total} bytes")


def fetch(kind: str, data_dir: Path) -> list[Path]:
    """Download every official file of ``kind`` into ``data_dir``, trying each mirror in turn."""
    fetched = []
    for filename, md5 in ARCHIVES[kind].items():
        errors = []
        for base in MIRRORS[kind]:
            try:
                fetched.append(download(base + filename, data_dir / filename, md5))
                break
            except (OSError, ValueError) as error:
                errors.append(str(error))
        else:
            raise OSError(f"{kind}: could not download {filename}: " + " | ".join(errors))
    return fetched


def extract_tar_gz(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest``, refusing members that would land outside it (or links, devices).

    Members are extracted into a temporary folder and moved into place at the end, so an interrupted extraction
    leaves no half-filled dataset folder.
    """
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            if Path(member.name).is_absolute() or ".." in Path(member.name).parts:
                raise ValueError(f"{archive}: refusing member {member.name!r}: it points outside the target folder")
            if not (member.isfile() or member.isdir()):
                raise ValueError(f"{archive}: refusing member {member.name!r}: only files and folders are expected")
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
        try:
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **extra)
            for entry in staging.iterdir():
                os.replace(entry, dest / entry.name)
        finally:
            shutil.rmtree(staging)
