"""One way to read and write shards and manifests, whether they live on local disk or S3.

A location is a string: a local path or an `s3://bucket/key` URL. Local writes are atomic
(a temporary name in the same folder, then a rename), so a reader never sees half a file.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from ulm_dist import storage
from ulm_dist.storage import S3Options

# Temporary files are created private (0600); finished data is readable by all, like any file.
_READABLE = 0o644


def join(base: str, *names: str) -> str:
    if storage.is_s3_url(base):
        return posixpath.join(base, *names)
    return str(Path(base, *names))


def parent(url: str) -> str:
    return posixpath.dirname(url) if storage.is_s3_url(url) else str(Path(url).parent)


def open_read(url: str, options: S3Options) -> BinaryIO:
    """A stream over the bytes at `url`; FileNotFoundError if nothing is there."""
    if storage.is_s3_url(url):
        return storage.open_object(url, options)
    return open(url, "rb")


def read_bytes(url: str, options: S3Options) -> bytes:
    if storage.is_s3_url(url):
        return storage.read_object(url, options)
    return Path(url).read_bytes()


def list_names(folder: str, options: S3Options) -> set[str]:
    """Names of the files directly in `folder`; empty if there is no such folder."""
    if storage.is_s3_url(folder):
        return storage.list_names(folder, options)
    path = Path(folder)
    return {entry.name for entry in path.iterdir() if entry.is_file()} if path.is_dir() else set()


def write_bytes(url: str, data: bytes, options: S3Options) -> None:
    if storage.is_s3_url(url):
        storage.put_object(url, data, options)
        return
    with tempfile.NamedTemporaryFile(dir=_make_folder(url), delete=False) as handle:
        handle.write(data)
    os.chmod(handle.name, _READABLE)
    os.replace(handle.name, url)


def staging_folder(url: str) -> str:
    """Where to write a local file that `move_file` will then put at `url`: beside it for a
    local destination (so that the move is a rename), the system temp folder for S3."""
    return tempfile.gettempdir() if storage.is_s3_url(url) else _make_folder(url)


def move_file(path: str, url: str, options: S3Options) -> None:
    """Moves a finished local file to `url` (uploading it, in parts if large, for S3)."""
    if storage.is_s3_url(url):
        storage.upload_file(path, url, options)
        os.unlink(path)
    else:
        os.chmod(path, _READABLE)
        shutil.move(path, url)


def _make_folder(url: str) -> str:
    folder = Path(url).parent
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)
