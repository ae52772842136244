"""The checkpoint store: where a run's checkpoints live, and which of them are complete.

`train.storage` is a local folder or `s3://bucket/prefix` (any S3-compatible store through
`data.s3_endpoint_url`), seen through one pyarrow filesystem that Ray Train uploads through
too. A run owns `<storage>/<run_name>/`; each checkpoint is a folder in it named after its
step. The store knows nothing of what is inside a checkpoint. Once every worker's upload of a
checkpoint is done, `mark_complete` writes a marker listing the checkpoint's files and sizes;
a checkpoint counts only if its marker is there, parses, and every listed file is present at
its size. A checkpoint half uploaded (a worker died mid-way), half deleted (pruning
interrupted) or tampered with is therefore never taken for the latest: `latest` is the one
answer to "where does this run stand", for resuming (`loop.resume_checkpoint`), pruning
(`prune`) and the tools that read a run (evaluate, export).
"""

from __future__ import annotations

import errno
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ulm_dist.redaction import redact_url
from ulm_dist.storage import CONNECT_TIMEOUT_S, DEFAULT_MAX_ATTEMPTS, DEFAULT_READ_TIMEOUT_S

MARKER_NAME = "checkpoint_complete.json"
CHECKPOINT_PREFIX = "checkpoint_"
S3_SCHEME = "s3://"


class StorageError(RuntimeError):
    """Storage that cannot be used, or a checkpoint that is not there; says what to do."""


def open_filesystem(
    uri: str,
    endpoint_url: str | None = None,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path within it for a local folder or an s3:// URI. S3
    requests follow the data's retry policy (`data.s3.S3Options`): at most `max_attempts`
    tries, each given up after `read_timeout_s` without an answer, so an outage or a hung
    server ends in an error within a bounded time. Ray Train uploads checkpoints through
    the same filesystem."""
    if uri.startswith(S3_SCHEME):
        filesystem = pafs.S3FileSystem(
            endpoint_override=endpoint_url,
            connect_timeout=CONNECT_TIMEOUT_S,
            # On Linux the SDK applies it as "less than 1 byte/s for this long" (curl).
            request_timeout=read_timeout_s,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
        )
        return filesystem, uri.removeprefix(S3_SCHEME).rstrip("/")
    if "://" in uri:
        raise StorageError(f"{uri}: expected a local folder or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


@dataclass(frozen=True)
class StoredCheckpoint:
    """A complete checkpoint: its step, its folder (a path in `filesystem`) and its marker's
    info."""

    step: int
    path: str
    info: dict[str, Any] = field(default_factory=dict)
    filesystem: pafs.FileSystem = field(
        default_factory=pafs.LocalFileSystem, compare=False, repr=False
    )


@dataclass(frozen=True)
class IncompleteCheckpoint:
    """A checkpoint folder that does not count, and why (no marker, a listed file missing)."""

    step: int
    path: str
    reason: str


@dataclass(frozen=True)
class RunCheckpoints:
    """A run's checkpoint folders, each list oldest first."""

    complete: list[StoredCheckpoint]
    incomplete: list[IncompleteCheckpoint]


class CheckpointStore:
    """The checkpoints of one run, `<storage>/<run_name>/checkpoint_<step>/`."""

    def __init__(
        self,
        storage: str,
        run_name: str,
        endpoint_url: str | None = None,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ):
        self.storage = storage
        self.endpoint_url = endpoint_url
        self.max_attempts = max_attempts
        self.read_timeout_s = read_timeout_s
        self.filesystem, self.root = open_filesystem(
            storage, endpoint_url, max_attempts=max_attempts, read_timeout_s=read_timeout_s
        )
        self.run_path = f"{self.root}/{run_name}"

    def uri(self, path: str) -> str:
        """A filesystem path of this store as the user would write it."""
        return S3_SCHEME + path if isinstance(self.filesystem, pafs.S3FileSystem) else path

    @staticmethod
    def checkpoint_dir_name(step: int) -> str:
        # Zero-padded so that names sort by step.
        return f"{CHECKPOINT_PREFIX}{step:08d}"

    @contextmanager
    def named_errors(self, operation: str) -> Iterator[None]:
        """Re-raise what the filesystem raises once its retries are spent as a StorageError
        naming the store, `operation` (what was being done) and what to do."""
        try:
            yield
        except OSError as error:
            if isinstance(self.filesystem, pafs.S3FileSystem):
                advice = (
                    f"the S3 store (endpoint {self.endpoint_url or 'AWS default'}) "
                    f"failed {self.max_attempts} attempts of at most {self.read_timeout_s:g} s "
                    "each (data.s3_max_attempts); check that it is up and reachable and the "
                    "credentials"
                )
            elif error.errno == errno.ENOSPC:
                advice = (
                    f"no space left on the device holding {self.uri(self.run_path)}; free "
                    "space there or point train.storage elsewhere"
                )
            else:
                advice = "check the folder's permissions and free space"
            # Redacted whole: the client's own message may quote the endpoint.
            raise StorageError(
                redact_url(
                    f"{operation} in {self.uri(self.run_path)} failed: {error}; {advice}, then "
                    "run the same command again: it continues from the last complete checkpoint"
                )
            ) from error

    def check_writable(self) -> None:
        """Write, read back and delete a probe in the run folder, or say why that failed."""
        probe = f"{self.run_path}/.write_probe"
        try:
            self.filesystem.create_dir(self.run_path, recursive=True)
            with self.filesystem.open_output_stream(probe) as stream:
                stream.write(b"ok")
            with self.filesystem.open_input_stream(probe) as stream:
                stream.read()
            self.filesystem.delete_file(probe)
        except OSError as error:
            raise StorageError(
                f"train.storage: cannot write to {self.uri(self.run_path)}: {error}. Expected a "
                "writable local folder or s3://bucket/prefix: check the path or that the bucket "
                "exists, the AWS credentials, and data.s3_endpoint_url for S3-compatible stores"
            ) from error

    def mark_complete(self, checkpoint_path: str, step: int, **info: Any) -> None:
        """Record that the checkpoint folder holds all its files (call after every upload)."""
        with self.named_errors(f"marking {checkpoint_path.rpartition('/')[2]} complete"):
            files = _files_under(self.filesystem, checkpoint_path)
            files.pop(MARKER_NAME, None)
            marker = {"step": step, "files": files, **info}
            # The marker is the last thing written and a single object: a reader sees all or
            # none.
            self._write(f"{checkpoint_path}/{MARKER_NAME}", json.dumps(marker, indent=1))

    def scan(self) -> RunCheckpoints:
        """The run's checkpoint folders, sorted into complete and incomplete ones."""
        # One listing of the whole run folder, grouped by checkpoint folder.
        folders: dict[str, dict[str, int]] = {}
        with self.named_errors("listing the checkpoints"):
            for relative, size in _files_under(self.filesystem, self.run_path).items():
                folder, _, name = relative.partition("/")
                if folder.startswith(CHECKPOINT_PREFIX) and name:
                    folders.setdefault(folder, {})[name] = size
            inspected = sorted(
                (
                    _inspect(self.filesystem, f"{self.run_path}/{folder}", files)
                    for folder, files in folders.items()
                ),
                key=lambda checkpoint: checkpoint.step,
            )
        return RunCheckpoints(
            complete=[c for c in inspected if isinstance(c, StoredCheckpoint)],
            incomplete=[c for c in inspected if isinstance(c, IncompleteCheckpoint)],
        )

    def checkpoints(self) -> list[StoredCheckpoint]:
        """The run's complete checkpoints, oldest first."""
        return self.scan().complete

    def latest(self) -> StoredCheckpoint | None:
        """The run's newest complete checkpoint: where it stands, and where it resumes from."""
        complete = self.checkpoints()
        return complete[-1] if complete else None

    def prune(self, keep: int) -> list[str]:
        """Delete all but the `keep` newest complete checkpoints, and the incomplete ones older
        than the newest complete one (abandoned uploads: nothing resumes from them); returns
        the deleted folders' names. Incomplete ones newer than it are left alone: a worker may
        be uploading one right now. Deleting goes oldest first, so an interrupted prune never
        leaves an older complete checkpoint without the newer ones."""
        run = self.scan()
        if not run.complete:
            return []
        newest = run.complete[-1].step
        doomed = sorted(
            [c for c in run.incomplete if c.step < newest] + run.complete[:-keep],
            key=lambda checkpoint: checkpoint.step,
        )
        for checkpoint in doomed:
            with self.named_errors(f"deleting {checkpoint.path.rpartition('/')[2]}"):
                self.filesystem.delete_dir(checkpoint.path)
        return [checkpoint.path.rpartition("/")[2] for checkpoint in doomed]

    def has_checkpoint_folders(self) -> bool:
        """Whether the run has any checkpoint folder at all, complete or not."""
        selector = pafs.FileSelector(self.run_path, allow_not_found=True)
        with self.named_errors("listing the run folder"):
            entries = self.filesystem.get_file_info(selector)
        # Folders only: Ray Train's checkpoint_manager_snapshot.json shares the prefix.
        return any(
            entry.base_name.startswith(CHECKPOINT_PREFIX) and entry.type == pafs.FileType.Directory
            for entry in entries
        )

    def open_checkpoint(self, uri: str) -> StoredCheckpoint:
        """A checkpoint named by the user, checked to be complete (see `open_checkpoint`)."""
        return open_checkpoint(uri, self.endpoint_url)

    def download(self, checkpoint: StoredCheckpoint, destination: Path) -> Path:
        """A local copy of the checkpoint's folder (for readers that need local files)."""
        destination.mkdir(parents=True, exist_ok=True)
        with self.named_errors(f"downloading {checkpoint.path.rpartition('/')[2]}"):
            _copy_to_local(self.filesystem, checkpoint.path, destination)
        return destination

    def exists(self, name: str) -> bool:
        with self.named_errors(f"looking for {name}"):
            info = self.filesystem.get_file_info(f"{self.run_path}/{name}")
        return info.type != pafs.FileType.NotFound

    def write_text(self, name: str, text: str) -> str:
        """Write a small file into the run folder; returns its URI."""
        path = f"{self.run_path}/{name}"
        with self.named_errors(f"writing {name}"):
            self._write(path, text)
        return self.uri(path)

    def _write(self, path: str, text: str) -> None:
        self.filesystem.create_dir(path.rpartition("/")[0], recursive=True)
        with self.filesystem.open_output_stream(path) as stream:
            stream.write(text.encode())


def open_checkpoint(uri: str, endpoint_url: str | None = None) -> StoredCheckpoint:
    """The complete checkpoint at `uri` (local path or s3:// URI), or a StorageError."""
    filesystem, path = open_filesystem(uri, endpoint_url)
    checkpoint = _inspect(filesystem, path, _files_under(filesystem, path))
    if isinstance(checkpoint, IncompleteCheckpoint):
        raise StorageError(
            f"{uri}: not a complete checkpoint ({checkpoint.reason}; expected a "
            f"{CHECKPOINT_PREFIX}<step> folder holding {MARKER_NAME} and every file it lists); "
            "pick one that a training run printed at its end"
        )
    return checkpoint


@contextmanager
def local_copy(
    uri: str, endpoint_url: str | None = None
) -> Iterator[tuple[Path, StoredCheckpoint]]:
    """The complete checkpoint at `uri` (see `open_checkpoint`) and a local folder holding it:
    the folder itself when it is local, else a temporary download, deleted on exit."""
    checkpoint = open_checkpoint(uri, endpoint_url)
    filesystem, _ = open_filesystem(uri, endpoint_url)
    if isinstance(filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path), checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="ulm_checkpoint_") as scratch:
        _copy_to_local(filesystem, checkpoint.path, Path(scratch))
        yield Path(scratch), checkpoint


def _copy_to_local(filesystem: pafs.FileSystem, path: str, destination: Path) -> None:
    pafs.copy_files(
        path,
        str(destination),
        source_filesystem=filesystem,
        destination_filesystem=pafs.LocalFileSystem(),
    )


def _files_under(filesystem: pafs.FileSystem, path: str) -> dict[str, int]:
    """Every file below `path` (relative name -> size); empty if `path` does not exist."""
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=True)
    return {
        entry.path.removeprefix(path + "/"): entry.size
        for entry in filesystem.get_file_info(selector)
        if entry.type == pafs.FileType.File
    }


def _step_from_name(path: str) -> int:
    """The step in a checkpoint folder's name (`checkpoint_00000012` -> 12), -1 if none."""
    digits = path.rstrip("/").rpartition("/")[2].removeprefix(CHECKPOINT_PREFIX)
    return int(digits) if digits.isdigit() else -1


def _inspect(
    filesystem: pafs.FileSystem, path: str, files: dict[str, int]
) -> StoredCheckpoint | IncompleteCheckpoint:
    """The checkpoint at `path`, complete if its marker parses and every file it lists is
    present at its size; `files` is what the folder holds (relative name -> size)."""

    def incomplete(reason: str) -> IncompleteCheckpoint:
        return IncompleteCheckpoint(_step_from_name(path), path, reason)

    if MARKER_NAME not in files:
        return incomplete(f"no {MARKER_NAME}")
    try:
        with filesystem.open_input_stream(f"{path}/{MARKER_NAME}") as stream:
            marker = json.loads(stream.read())
        expected, step = marker.pop("files"), marker.pop("step")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return incomplete(f"{MARKER_NAME} unreadable or truncated")
    missing = sorted(name for name, size in expected.items() if files.get(name) != size)
    if missing:
        return incomplete(f"{', '.join(missing)} missing or of another size than its marker says")
    return StoredCheckpoint(step=step, path=path, info=marker, filesystem=filesystem)
