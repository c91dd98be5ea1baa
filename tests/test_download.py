"""Tests of the data root and checksum-verified downloads (lightning_unlearn/data/download.py).

Downloads go to a local HTTP server on 127.0.0.1; nothing here reaches the internet.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import socket
import threading
import zipfile
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

from lightning_unlearn.data import download
from lightning_unlearn.data.download import ENV_VAR, Archive, DataNotFoundError, data_root, find_file
from lightning_unlearn.data.sources import MovieLens100K

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n196\t51\t5\t880606923\n"


class Server(NamedTuple):
    url: str  # of ml-100k.zip
    md5: str
    requests: list[str]  # paths requested so far


def make_zip(path: Path, files: dict[str, str]) -> str:
    """Write a zip holding ``files`` and return its md5."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return hashlib.md5(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound here and never listened on, so no other process takes it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_proxy_no_env(monkeypatch):
    """Keep requests to 127.0.0.1 local and the data root under each test's control."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def server(tmp_path) -> Iterator[Server]:
    site = tmp_path / "site"
    site.mkdir()
    md5 = make_zip(site / "ml-100k.zip", {"ml-100k/u.data": U_DATA, "ml-100k/README": "readme\n"})
    make_zip(site / "other.zip", {"something/else.txt": "x"})
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}/ml-100k.zip", md5, requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def use_archive(monkeypatch, url: str, md5: str) -> None:
    monkeypatch.setattr(download, "ARCHIVES", {"ml-100k": Archive(url, md5)})


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --------------------------------------------------------------------------- data_root


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "lightning_unlearn"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_data_root_empty_variables_fall_through(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_root() == tmp_path / ".cache" / "lightning_unlearn"


def test_data_root_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_root("~/data") == tmp_path / "data"
    monkeypatch.setenv(ENV_VAR, "~/env")
    assert data_root() == tmp_path / "env"


# --------------------------------------------------------------------------- find_file


def test_find_file_present(tmp_path, monkeypatch):
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_text(U_DATA)
    assert find_file("ml-100k/u.data", tmp_path) == tmp_path / "ml-100k" / "u.data"
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert find_file("ml-100k/u.data") == tmp_path / "ml-100k" / "u.data"


def test_find_file_missing_names_path_and_env_var(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        find_file("ml-100k/u.data", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "ml-100k" / "u.data") in message
    assert ENV_VAR in message
    assert isinstance(err.value, FileNotFoundError)
    assert leftovers(tmp_path) == []


def test_find_file_missing_without_download_suggests_it(tmp_path, monkeypatch):
    use_archive(monkeypatch, "http://127.0.0.1:9/ml-100k.zip", "0" * 32)
    with pytest.raises(DataNotFoundError, match=r"download=True.*http://127\.0\.0\.1:9/ml-100k\.zip"):
        find_file("ml-100k/u.data", tmp_path, archive="ml-100k")
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- downloads


def test_download_fetches_verifies_and_unpacks(server, tmp_path, monkeypatch):
    use_archive(monkeypatch, server.url, server.md5)
    root = tmp_path / "root"  # does not exist yet
    path = find_file("ml-100k/u.data", root, archive="ml-100k", download=True)
    assert path == root / "ml-100k" / "u.data"
    assert path.read_text() == U_DATA
    assert leftovers(root) == ["ml-100k", "ml-100k/README", "ml-100k/u.data"]  # no *.part, no temp dir
    assert server.requests == ["/ml-100k.zip"]
    # A second call finds the file without downloading again.
    assert find_file("ml-100k/u.data", root, archive="ml-100k", download=True) == path
    assert server.requests == ["/ml-100k.zip"]


def test_download_with_wrong_checksum_leaves_nothing_behind(server, tmp_path, monkeypatch):
    use_archive(monkeypatch, server.url, "0" * 32)
    root = tmp_path / "root"
    with pytest.raises(DataNotFoundError, match="checksum") as err:
        find_file("ml-100k/u.data", root, archive="ml-100k", download=True)
    assert server.md5 in str(err.value) and "0" * 32 in str(err.value)
    assert server.requests == ["/ml-100k.zip"]
    assert list(root.glob("**/*.part")) == []
    assert not (root / "ml-100k").exists()
    assert leftovers(root) == []


def test_download_completes_a_partial_copy(server, tmp_path, monkeypatch):
    use_archive(monkeypatch, server.url, server.md5)
    root = tmp_path / "root"
    (root / "ml-100k").mkdir(parents=True)  # an earlier, partial copy without u.data
    path = find_file("ml-100k/u.data", root, archive="ml-100k", download=True)
    assert path.read_text() == U_DATA


def test_download_from_closed_port(tmp_path, monkeypatch):
    with closed_port() as port:
        url = f"http://127.0.0.1:{port}/ml-100k.zip"
        use_archive(monkeypatch, url, "0" * 32)
        with pytest.raises(DataNotFoundError, match=rf"Downloading {url} failed"):
            find_file("ml-100k/u.data", tmp_path / "root", archive="ml-100k", download=True)
    assert leftovers(tmp_path / "root") == []


def test_download_missing_url_is_an_error(server, tmp_path, monkeypatch):
    use_archive(monkeypatch, server.url.replace("ml-100k.zip", "nope.zip"), server.md5)
    with pytest.raises(DataNotFoundError, match="404"):
        find_file("ml-100k/u.data", tmp_path / "root", archive="ml-100k", download=True)
    assert leftovers(tmp_path / "root") == []


def test_download_archive_without_the_file(server, tmp_path, monkeypatch):
    other = tmp_path / "site" / "other.zip"
    use_archive(monkeypatch, server.url.replace("ml-100k.zip", "other.zip"), hashlib.md5(other.read_bytes()).hexdigest())
    with pytest.raises(DataNotFoundError, match=r"did not contain 'ml-100k/u\.data'"):
        find_file("ml-100k/u.data", tmp_path / "root", archive="ml-100k", download=True)


# --------------------------------------------------------------------------- MovieLens100K source


def test_movielens100k_source_downloads_and_loads(server, tmp_path, monkeypatch):
    use_archive(monkeypatch, server.url, server.md5)
    source = MovieLens100K(root=tmp_path / "root", download=True)
    source.prepare()
    assert (tmp_path / "root" / "ml-100k" / "u.data").read_text() == U_DATA
    data, test = source.load()
    assert test is None
    assert (len(data), data.num_users, data.num_items) == (4, 3, 4)
    assert data.user_ids.tolist() == [22, 186, 196]
    assert data.ratings.tolist() == [3.0, 3.0, 1.0, 5.0]
    assert server.requests == ["/ml-100k.zip"]  # load() reuses the prepared file

    positives, _ = MovieLens100K(root=tmp_path / "root", min_rating=3).load()
    assert (len(positives), positives.num_users, positives.num_items) == (3, 2, 3)
    assert positives.user_ids.tolist() == [186, 196]
    assert positives.item_ids.tolist() == [51, 242, 302]


def test_movielens100k_source_without_download(server, tmp_path, monkeypatch):
    use_archive(monkeypatch, server.url, server.md5)
    with pytest.raises(DataNotFoundError, match="download=True"):
        MovieLens100K(root=tmp_path / "root").load()
    assert server.requests == []
