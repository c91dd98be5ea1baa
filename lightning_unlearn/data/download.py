"""Where data lives: the data root, and checksum-verified downloads of public archives."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["ARCHIVES", "ENV_VAR", "Archive", "DataNotFoundError", "data_root", "download_archive", "find_file"]

ENV_VAR = "LIGHTNING_UNLEARN_DATA"


class DataNotFoundError(FileNotFoundError):
    """A data file is not where it was looked for (the message says where, and how to fix it)."""


@dataclass(frozen=True)
class Archive:
    """A public zip archive of a data set and its published MD5 checksum."""

    url: str
    md5: str


ARCHIVES = {
    "ml-100k": Archive("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"),
    "ml-1m": Archive("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$LIGHTNING_UNLEARN_DATA``, else a cache directory.

    Example:
        >>> str(data_root("/tmp/x"))
        '/tmp/x'
    """
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lightning_unlearn"


def find_file(relative: str, root: str | os.PathLike | None = None, archive: str | None = None, download: bool = False) -> Path:
    """Find ``relative`` under the data root, downloading its archive there if asked to.

    Args:
        relative: the file's path below the root, e.g. ``"ml-100k/u.data"``.
        root: an explicit root (see :func:`data_root`).
        archive: the key in :data:`ARCHIVES` whose zip holds the file.
        download: fetch and unpack the archive when the file is missing.

    Raises:
        DataNotFoundError: the file is missing (and was not or could not be downloaded);
            the message names the path looked at and how to point the library at data.
    """
    base = data_root(root)
    path = base / relative
    if path.is_file():
        return path
    hint = (
        f"Data file not found: {path}. Point lightning_unlearn at a folder holding '{relative}' with "
        f"`root=...` (in a recipe: `data.source.init_args.root`) or the environment variable {ENV_VAR}"
    )
    if archive is None:
        raise DataNotFoundError(hint + ".")
    if not download:
        raise DataNotFoundError(hint + f", or pass `download=True` to fetch {ARCHIVES[archive].url}.")
    try:
        download_archive(ARCHIVES[archive], base)
    except (urllib.error.URLError, OSError) as err:
        raise DataNotFoundError(f"{hint}. Downloading {ARCHIVES[archive].url} failed: {err}") from err
    if not path.is_file():
        raise DataNotFoundError(f"{hint}. The archive {ARCHIVES[archive].url} did not contain '{relative}'.")
    return path


def download_archive(archive: Archive, root: Path, progress: bool = True) -> None:
    """Download ``archive`` into ``root``, verify its MD5, and unpack it.

    The download goes to a temporary file that is removed on failure, so an interrupted or
    corrupted download never leaves a half-written data set behind.

    Raises:
        OSError: the download failed or its checksum does not match (names both sums).
    """
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5()
    with tempfile.NamedTemporaryFile(dir=root, suffix=".part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(archive.url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                name = archive.url.rsplit("/", 1)[-1]
                with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
                    while chunk := response.read(1 << 16):
                        tmp.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            tmp.close()
            if digest.hexdigest() != archive.md5:
                raise OSError(f"checksum mismatch for {archive.url}: md5 {digest.hexdigest()}, expected {archive.md5}")
            with zipfile.ZipFile(tmp.name) as zf, tempfile.TemporaryDirectory(dir=root) as unpack:
                zf.extractall(unpack)
                for entry in Path(unpack).iterdir():  # merge: a partial earlier copy is completed
                    target = root / entry.name
                    if entry.is_dir():
                        shutil.copytree(entry, target, dirs_exist_ok=True)
                    elif not target.exists():
                        shutil.move(str(entry), target)
        finally:
            Path(tmp.name).unlink(missing_ok=True)
