"""Download of the official MovieLens archives, verified before use.

Only archives with a known checksum are fetched. Each download goes to a temporary folder inside
the cache and is renamed into place only after verification, so the cache never holds a partial
or unverified copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from common.errors import DataError

_BASE = "https://files.grouplens.org/datasets/movielens"
VERIFIED = ".fedrec-verified"  # marker in a verified folder, holding the digest it was checked against


@dataclasses.dataclass(frozen=True)
class Source:
    url: str
    checked: str     # file whose digest is known, relative to the extracted archive; "" = the archive
    algorithm: str   # "sha256", or "git-blob": sha1 of b"blob <size>\0" + content (`git hash-object`)
    digest: str


# Digests from shared/data/SOURCES.md; they are all that is known for each archive.
SOURCES: dict[str, Source] = {
    "ml-100k": Source(f"{_BASE}/ml-100k.zip", "ml-100k/u.data", "sha256",
                      "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"),
    "ml-1m": Source(f"{_BASE}/ml-1m.zip", "ml-1m/ratings.dat", "git-blob",
                    "77a7c4b150f588c23bb9e1f068aa996c0b413695"),
    "ml-latest-small": Source(f"{_BASE}/ml-latest-small.zip", "", "sha256",
                              "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436"),
}


def fetch_movielens(name: str, cache_dir: Path) -> Path:
    """The folder holding dataset `name`'s ratings file under `cache_dir`, downloaded, verified
    and extracted on first use; an already verified copy is reused without network access."""
    source = SOURCES.get(name)
    if source is None:
        raise DataError(f"MovieLens {name} cannot be downloaded automatically (no known checksum): "
                        f"download it from https://grouplens.org/datasets/movielens/ and pass --data-dir")
    target = Path(cache_dir) / name
    if _verified(target, source.digest):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        archive = work / "archive.zip"
        _download(source.url, archive)
        extracted = work / "extracted"
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(extracted)
        except zipfile.BadZipFile:
            raise DataError(f"{source.url} is not a valid zip archive; pass --data-dir with the local files") from None
        checked = extracted / source.checked if source.checked else archive
        if not checked.is_file():
            raise DataError(f"{source.url} has no {source.checked}; pass --data-dir with the local files")
        actual = _digest(checked, source.algorithm)
        if actual != source.digest:
            raise DataError(f"checksum mismatch for {source.checked or source.url}: expected {source.algorithm} "
                            f"{source.digest}, got {actual}; nothing was kept")
        folder = extracted / name
        if not folder.is_dir():
            raise DataError(f"{source.url} has no {name}/ folder; pass --data-dir with the local files")
        (folder / VERIFIED).write_text(source.digest)
        if target.exists() and not _verified(target, source.digest):
            shutil.rmtree(target)  # an unverified leftover
        if not target.exists():  # else another process finished the same download first
            folder.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _verified(folder: Path, digest: str) -> bool:
    marker = folder / VERIFIED
    return marker.is_file() and marker.read_text().strip() == digest


def _download(url: str, destination: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, destination.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        return
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        reason = str(e.reason)
    except (OSError, http.client.HTTPException) as e:
        reason = str(e) or type(e).__name__
    raise DataError(f"could not download {url} ({reason.splitlines()[0]}); pass --data-dir with the local files")


def _digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file: sha256 of the bytes, or its git blob id."""
    if algorithm == "sha256":
        digest = hashlib.sha256()
    elif algorithm == "git-blob":
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    else:
        raise DataError(f"unknown checksum algorithm {algorithm!r}")
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
