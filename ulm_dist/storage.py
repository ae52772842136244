"""Local and S3 storage, one layer for data, checkpoints, evaluation and export.

A location is a string: a local path or an `s3://bucket/key` URL. Two clients reach S3, both
built from one `S3Options` (endpoint, attempts, timeout), filled from the config by
`s3_options` (`data.s3_endpoint_url`, `data.s3_max_attempts`):

- boto3, for shards and manifests (`open_read`, `read_bytes`, `write_bytes`, `move_file`,
  `list_names`): streaming reads, multipart uploads and errors that name the URL;
- a pyarrow filesystem (`open_filesystem`, `StorageFolder`), for run and sweep folders,
  because Ray Train and Ray Tune upload checkpoints and results through one.

Credentials come from the standard AWS chain (environment, ~/.aws, instance roles); an
`endpoint_url` points the clients at an S3-compatible store (MinIO, Ceph, moto). Transient
failures (throttling, 5xx, refused or dropped connections) are retried: at most
`max_attempts` tries with jittered exponential backoff, each given up after `read_timeout_s`
without an answer (a hung server), so an outage ends in an error within a bounded time. What
still fails is raised naming the URL and the endpoint: `S3AccessError` from boto3 (a missing
object is an `ObjectNotFound`, a `FileNotFoundError` like a missing local file, so that a
reader can skip it and go on), `StorageError` from a `StorageFolder` (`named_errors`).
Local writes are atomic (a temporary name in the same folder, then a rename), so a reader
never sees half a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig

from ulm_dist.config import DataConfig
from ulm_dist.redaction import redact_url

S3_SCHEME = "s3://"

# S3 through boto3 (shards and manifests).

# The retry policy of every S3 client here (boto3 for data, pyarrow for checkpoints): the
# defaults of `S3Options`, which `s3_options` fills from the config.
DEFAULT_MAX_ATTEMPTS = 5  # data.s3_max_attempts' default
# Connecting takes milliseconds when the endpoint is up; an endpoint that does not answer is
# given up on after this long, not the clients' minutes.
CONNECT_TIMEOUT_S = 5.0
# Seconds without a byte from the server before a request counts as failed and is retried.
DEFAULT_READ_TIMEOUT_S = 20.0

# Shards above this size are uploaded in parts of this size (S3 allows at most 10,000 parts).
MULTIPART_BYTES = 64 * 2**20

_MISSING_OBJECT_CODES = {"NoSuchKey", "404", "NotFound"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "Forbidden",
    "403",
}


class S3AccessError(RuntimeError):
    """S3 cannot be used at all for this URL: missing bucket, credentials, endpoint."""


class ObjectNotFound(FileNotFoundError):
    """The bucket answered, but holds no object under this key."""


@dataclass(frozen=True)
class S3Options:
    """Where S3 is and how hard to try: the one retry policy of both clients."""

    endpoint_url: str | None = None  # None: AWS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # tries per request (data.s3_max_attempts)
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S  # per try, without a byte from the server


def s3_options(data: DataConfig) -> S3Options:
    """The policy the config asks for: `data.s3_endpoint_url`, `data.s3_max_attempts`."""
    return S3Options(endpoint_url=data.s3_endpoint_url, max_attempts=data.s3_max_attempts)


def is_s3_url(url: str) -> bool:
    return url.startswith(S3_SCHEME)


def split_s3_url(url: str) -> tuple[str, str]:
    """("bucket", "key/inside") from "s3://bucket/key/inside"."""
    if not is_s3_url(url):
        raise ValueError(f"expected an s3://bucket/key URL, got {url!r}")
    bucket, _, key = url.removeprefix(S3_SCHEME).partition("/")
    if not bucket:
        raise ValueError(f"expected an s3://bucket/key URL with a bucket name, got {url!r}")
    return bucket, key


def s3_client(options: S3Options) -> Any:
    """A boto3 S3 client for this process (boto3 clients must not cross a fork)."""
    return _client_for_process(options, os.getpid())


@lru_cache(maxsize=8)
def _client_for_process(options: S3Options, pid: int) -> Any:
    config = botocore.config.Config(
        retries={"max_attempts": options.max_attempts, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=options.read_timeout_s,
    )
    return boto3.session.Session().client("s3", endpoint_url=options.endpoint_url, config=config)


@contextlib.contextmanager
def _named_errors(url: str, options: S3Options) -> Iterator[None]:
    """Re-raise botocore's errors as ObjectNotFound or S3AccessError naming URL and endpoint,
    the endpoint's credentials redacted: the message travels into logs and sweep tables."""
    where = f"{url} (endpoint {redact_url(options.endpoint_url or 'AWS default')})"
    try:
        yield
    except botocore.exceptions.ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "unknown"))
        message = error.response.get("Error", {}).get("Message", "")
        if code in _MISSING_OBJECT_CODES:
            raise ObjectNotFound(f"{url}: no such object") from error
        if code == "NoSuchBucket":
            raise S3AccessError(
                f"{where}: the bucket does not exist; create it or fix the URL"
            ) from error
        if code in _CREDENTIAL_CODES:
            raise S3AccessError(
                f"{where}: access refused ({code}: {message}); check the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's permissions"
            ) from error
        raise S3AccessError(f"{where}: {code}: {message}") from error
    except botocore.exceptions.NoCredentialsError as error:
        raise S3AccessError(
            f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an instance role is available"
        ) from error
    except boto3.exceptions.S3UploadFailedError as error:
        # The client's own words may quote the endpoint: redacted too.
        raise S3AccessError(redact_url(f"{where}: upload failed: {error}")) from error
    except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as error:
        raise S3AccessError(
            redact_url(
                f"{where}: cannot reach the endpoint after {options.max_attempts} attempts "
                f"({error}); check data.s3_endpoint_url and the network"
            )
        ) from error


def open_object(url: str, options: S3Options) -> BinaryIO:
    """A stream over the object's bytes, read from the network as it is consumed."""
    bucket, key = split_s3_url(url)
    with _named_errors(url, options):
        return s3_client(options).get_object(Bucket=bucket, Key=key)["Body"]


def read_object(url: str, options: S3Options) -> bytes:
    stream = open_object(url, options)
    with _named_errors(url, options):
        return stream.read()


def list_objects(folder_url: str, options: S3Options) -> set[str]:
    """Names of the objects directly in the "folder" `folder_url` (the prefix up to a '/')."""
    bucket, key = split_s3_url(folder_url)
    prefix = f"{key.rstrip('/')}/" if key else ""
    names: set[str] = set()
    with _named_errors(folder_url, options):
        pages = (
            s3_client(options)
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        )
        for page in pages:
            names.update(item["Key"].removeprefix(prefix) for item in page.get("Contents", []))
    return names


def put_object(url: str, data: bytes, options: S3Options) -> None:
    bucket, key = split_s3_url(url)
    with _named_errors(url, options):
        s3_client(options).put_object(Bucket=bucket, Key=key, Body=data)


def upload_file(path: str, url: str, options: S3Options, part_bytes: int = MULTIPART_BYTES) -> None:
    """Uploads a local file, in parallel parts of `part_bytes` when it is larger than that."""
    bucket, key = split_s3_url(url)
    transfer = TransferConfig(multipart_threshold=part_bytes, multipart_chunksize=part_bytes)
    with _named_errors(url, options):
        s3_client(options).upload_file(path, bucket, key, Config=transfer)


# Locations: a local path or an s3:// URL, read and written alike.

# Temporary files are created private (0600); finished data is readable by all, like any file.
_READABLE = 0o644


def join(base: str, *names: str) -> str:
    if is_s3_url(base):
        return posixpath.join(base, *names)
    return str(Path(base, *names))


def parent(url: str) -> str:
    return posixpath.dirname(url) if is_s3_url(url) else str(Path(url).parent)


def open_read(url: str, options: S3Options) -> BinaryIO:
    """A stream over the bytes at `url`; FileNotFoundError if nothing is there."""
    if is_s3_url(url):
        return open_object(url, options)
    return open(url, "rb")


def read_bytes(url: str, options: S3Options) -> bytes:
    if is_s3_url(url):
        return read_object(url, options)
    return Path(url).read_bytes()


def list_names(folder: str, options: S3Options) -> set[str]:
    """Names of the files directly in `folder`; empty if there is no such folder."""
    if is_s3_url(folder):
        return list_objects(folder, options)
    path = Path(folder)
    return {entry.name for entry in path.iterdir() if entry.is_file()} if path.is_dir() else set()


def write_bytes(url: str, data: bytes, options: S3Options) -> None:
    if is_s3_url(url):
        put_object(url, data, options)
        return
    with tempfile.NamedTemporaryFile(dir=_make_folder(url), delete=False) as handle:
        handle.write(data)
    os.chmod(handle.name, _READABLE)
    os.replace(handle.name, url)


def staging_folder(url: str) -> str:
    """Where to write a local file that `move_file` will then put at `url`: beside it for a
    local destination (so that the move is a rename), the system temp folder for S3."""
    return tempfile.gettempdir() if is_s3_url(url) else _make_folder(url)


def move_file(path: str, url: str, options: S3Options) -> None:
    """Moves a finished local file to `url` (uploading it, in parts if large, for S3)."""
    if is_s3_url(url):
        upload_file(path, url, options)
        os.unlink(path)
    else:
        os.chmod(path, _READABLE)
        shutil.move(path, url)


def _make_folder(url: str) -> str:
    folder = Path(url).parent
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


# Local or S3 folders through pyarrow (run and sweep folders; Ray uploads through them).


class StorageError(RuntimeError):
    """Storage that cannot be used, or a checkpoint that is not there; says what to do."""


def open_filesystem(uri: str, s3: S3Options) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path within it for a local folder or an s3:// URI, its
    S3 requests bounded by `s3` as boto3's are."""
    if is_s3_url(uri):
        filesystem = pafs.S3FileSystem(
            endpoint_override=s3.endpoint_url,
            connect_timeout=CONNECT_TIMEOUT_S,
            # On Linux the SDK applies it as "less than 1 byte/s for this long" (curl).
            request_timeout=s3.read_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s3.max_attempts),
        )
        return filesystem, uri.removeprefix(S3_SCHEME).rstrip("/")
    if "://" in uri:
        raise StorageError(f"{uri}: expected a local folder or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


class StorageFolder:
    """The folder `<storage>/<name>/` (a run's, a sweep's) on local disk or S3, through one
    pyarrow filesystem; what fails once its retries are spent is a StorageError saying what
    to do."""

    def __init__(self, storage: str, name: str, s3: S3Options | None = None):
        self.storage = storage
        self.s3 = s3 or S3Options()
        self.filesystem, self.root = open_filesystem(storage, self.s3)
        self.path = f"{self.root}/{name}"

    def uri(self, path: str) -> str:
        """A filesystem path of this folder as the user would write it."""
        return S3_SCHEME + path if isinstance(self.filesystem, pafs.S3FileSystem) else path

    @contextlib.contextmanager
    def named_errors(self, operation: str) -> Iterator[None]:
        """Re-raise what the filesystem raises once its retries are spent as a StorageError
        naming the folder, `operation` (what was being done) and what to do."""
        try:
            yield
        except OSError as error:
            raise self.storage_error(operation, error) from error

    def storage_error(self, operation: str, error: OSError) -> StorageError:
        """The StorageError for `error`, raised by this folder's filesystem while doing
        `operation`, also for failures caught by someone else (Ray Train's controller)."""
        if isinstance(self.filesystem, pafs.S3FileSystem):
            advice = (
                f"the S3 store (endpoint {redact_url(self.s3.endpoint_url or 'AWS default')}) "
                f"failed {self.s3.max_attempts} attempts of at most "
                f"{self.s3.read_timeout_s:g} s each (data.s3_max_attempts); check that it is "
                "up and reachable and the credentials"
            )
        elif error.errno == errno.ENOSPC:
            advice = (
                f"no space left on the device holding {self.uri(self.path)}; free "
                "space there or point train.storage elsewhere"
            )
        else:
            advice = "check the folder's permissions and free space"
        # Redacted whole: the client's own message may quote the endpoint.
        return StorageError(
            redact_url(
                f"{operation} in {self.uri(self.path)} failed: {error}; {advice}, then "
                "run the same command again: it continues from the last complete checkpoint"
            )
        )

    def check_writable(self) -> None:
        """Write, read back and delete a probe in the folder, or say why that failed."""
        probe = f"{self.path}/.write_probe"
        try:
            self.filesystem.create_dir(self.path, recursive=True)
            with self.filesystem.open_output_stream(probe) as stream:
                stream.write(b"ok")
            with self.filesystem.open_input_stream(probe) as stream:
                stream.read()
            self.filesystem.delete_file(probe)
        except OSError as error:
            raise StorageError(
                redact_url(
                    f"train.storage: cannot write to {self.uri(self.path)}: {error}. Expected "
                    "a writable local folder or s3://bucket/prefix: check the path or that the "
                    "bucket exists, the AWS credentials, and data.s3_endpoint_url for "
                    "S3-compatible stores"
                )
            ) from error

    def exists(self, name: str) -> bool:
        with self.named_errors(f"looking for {name}"):
            info = self.filesystem.get_file_info(f"{self.path}/{name}")
        return info.type != pafs.FileType.NotFound

    def write_text(self, name: str, text: str) -> str:
        """Write a small file into the folder; returns its URI."""
        path = f"{self.path}/{name}"
        with self.named_errors(f"writing {name}"):
            write_file(self.filesystem, path, text.encode())
        return self.uri(path)

    def delete_file(self, name: str, operation: str) -> None:
        """Delete the folder's file `name` if it is there."""
        path = f"{self.path}/{name}"
        with self.named_errors(operation):
            if self.filesystem.get_file_info(path).type == pafs.FileType.File:
                self.filesystem.delete_file(path)


def write_file(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    filesystem.create_dir(path.rpartition("/")[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


def files_under(filesystem: pafs.FileSystem, path: str) -> dict[str, int]:
    """Every file below `path` (relative name -> size); empty if `path` does not exist."""
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=True)
    return {
        entry.path.removeprefix(path + "/"): entry.size
        for entry in filesystem.get_file_info(selector)
        if entry.type == pafs.FileType.File
    }


def copy_to_local(filesystem: pafs.FileSystem, path: str, destination: Path) -> None:
    pafs.copy_files(
        path,
        str(destination),
        source_filesystem=filesystem,
        destination_filesystem=pafs.LocalFileSystem(),
    )
