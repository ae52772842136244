"""S3 access for shards and manifests: URL parsing, clients with bounded retries, streaming
reads, multipart uploads, and errors that name the URL.

Credentials come from the standard AWS chain (environment, ~/.aws, instance roles); an
`endpoint_url` points the client at an S3-compatible store (MinIO, Ceph, moto). Transient
failures (throttling, 5xx, refused or dropped connections) are retried by botocore's
"standard" mode: at most `max_attempts` tries with jittered exponential backoff, each given up
after `read_timeout_s` without an answer (a hung server). The checkpoint store's pyarrow
client (`store.open_filesystem`) follows the same policy. What still
fails is raised as `S3AccessError` naming the URL and the endpoint, except a missing object,
which is an `ObjectNotFound` (a `FileNotFoundError`, like a missing local file) so that a
reader can skip it and go on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

# The retry policy of every S3 client here (data through boto3, checkpoints through pyarrow).
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
    endpoint_url: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """("bucket", "key/inside") from "s3://bucket/key/inside"."""
    if not is_s3_url(url):
        raise ValueError(f"expected an s3://bucket/key URL, got {url!r}")
    bucket, _, key = url[len("s3://") :].partition("/")
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
    """Re-raise botocore's errors as ObjectNotFound or S3AccessError naming URL and endpoint."""
    where = f"{url} (endpoint {options.endpoint_url or 'AWS default'})"
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
        raise S3AccessError(f"{where}: upload failed: {error}") from error
    except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as error:
        raise S3AccessError(
            f"{where}: cannot reach the endpoint after {options.max_attempts} attempts "
            f"({error}); check data.s3_endpoint_url and the network"
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


def list_names(folder_url: str, options: S3Options) -> set[str]:
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
