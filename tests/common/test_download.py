"""fetch_movielens against a local HTTP server; never the internet."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import common.download as download
from common.config import Config
from common.dataset import DataError, load_dataset
from common.download import Source, fetch_movielens

U_DATA = b"1\t10\t4\t100\n1\t20\t5\t200\n1\t30\t3\t300\n"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves) of a local HTTP server on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return buffer.getvalue()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-100k.zip"


def publish(monkeypatch, root: Path, base: str, name: str, archive: bytes, checked: str, algorithm: str,
            digest: str) -> None:
    (root / f"{name}.zip").write_bytes(archive)
    monkeypatch.setitem(download.SOURCES, name, Source(f"{base}/{name}.zip", checked, algorithm, digest))


def test_download_verify_extract_then_reuse(server, monkeypatch, tmp_path):
    base, root = server
    publish(monkeypatch, root, base, "ml-100k", make_zip({"ml-100k/u.data": U_DATA, "ml-100k/u.item": b"10|T|x\n"}),
            "ml-100k/u.data", "sha256", hashlib.sha256(U_DATA).hexdigest())
    cache = tmp_path / "downloads"
    folder = fetch_movielens("ml-100k", cache)
    assert folder == cache / "ml-100k"
    assert (folder / "u.data").read_bytes() == U_DATA
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k"]  # no temp leftovers

    (root / "ml-100k.zip").unlink()  # a second call must not download
    assert fetch_movielens("ml-100k", cache) == folder


def test_unverified_leftover_is_replaced(server, monkeypatch, tmp_path):
    base, root = server
    publish(monkeypatch, root, base, "ml-100k", make_zip({"ml-100k/u.data": U_DATA}), "ml-100k/u.data", "sha256",
            hashlib.sha256(U_DATA).hexdigest())
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_bytes(b"partial")
    assert (fetch_movielens("ml-100k", tmp_path) / "u.data").read_bytes() == U_DATA


def test_archive_checksum_and_git_blob(server, monkeypatch, tmp_path):
    base, root = server
    archive = make_zip({"ml-latest-small/ratings.csv": b"userId,movieId,rating,timestamp\n"})
    publish(monkeypatch, root, base, "ml-latest-small", archive, "", "sha256", hashlib.sha256(archive).hexdigest())
    assert (fetch_movielens("ml-latest-small", tmp_path) / "ratings.csv").is_file()

    ratings = b"1::10::4::100\n"
    blob = hashlib.sha1(b"blob %d\0" % len(ratings) + ratings).hexdigest()
    publish(monkeypatch, root, base, "ml-1m", make_zip({"ml-1m/ratings.dat": ratings}), "ml-1m/ratings.dat",
            "git-blob", blob)
    assert (fetch_movielens("ml-1m", tmp_path) / "ratings.dat").read_bytes() == ratings


def test_checksum_mismatch_leaves_nothing(server, monkeypatch, tmp_path):
    base, root = server
    publish(monkeypatch, root, base, "ml-100k", make_zip({"ml-100k/u.data": U_DATA}), "ml-100k/u.data",
            "sha256", "0" * 64)
    cache = tmp_path / "downloads"
    with pytest.raises(DataError, match="checksum mismatch for ml-100k/u.data") as error:
        fetch_movielens("ml-100k", cache)
    assert "\n" not in str(error.value)
    assert list(cache.iterdir()) == []


def test_not_a_zip(server, monkeypatch, tmp_path):
    base, root = server
    publish(monkeypatch, root, base, "ml-100k", b"<html>moved</html>", "ml-100k/u.data", "sha256", "0" * 64)
    with pytest.raises(DataError, match="not a valid zip archive"):
        fetch_movielens("ml-100k", tmp_path / "downloads")
    assert list((tmp_path / "downloads").iterdir()) == []


def test_http_error_and_unreachable_host_ask_for_data_dir(server, monkeypatch, tmp_path):
    base, _ = server
    monkeypatch.setitem(download.SOURCES, "ml-100k", Source(f"{base}/missing.zip", "", "sha256", "0" * 64))
    with pytest.raises(DataError, match=r"could not download .*missing.zip \(HTTP 404.*pass --data-dir"):
        fetch_movielens("ml-100k", tmp_path)
    monkeypatch.setitem(download.SOURCES, "ml-100k", Source(closed_port_url(), "", "sha256", "0" * 64))
    with pytest.raises(DataError, match=r"could not download .*; pass --data-dir with the local files") as error:
        fetch_movielens("ml-100k", tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["ml-latest", "ml-25m"])
def test_large_sets_are_not_downloadable(name, tmp_path):
    with pytest.raises(DataError, match="cannot be downloaded automatically.*pass --data-dir"):
        fetch_movielens(name, tmp_path)


def test_load_dataset_downloads_when_no_data_dir(server, monkeypatch, isolated_cache):
    base, root = server
    publish(monkeypatch, root, base, "ml-100k", make_zip({"ml-100k/u.data": U_DATA, "ml-100k/u.item": b"10|Ten|x\n"}),
            "ml-100k/u.data", "sha256", hashlib.sha256(U_DATA).hexdigest())
    data = load_dataset(Config.from_run_config({"dataset": "ml-100k", "data-dir": ""}))
    assert data.sequences[0].tolist() == [1, 2, 3]
    assert list(data.titles) == ["Ten", "", ""]
    assert (isolated_cache / "downloads" / "ml-100k" / "u.data").is_file()
