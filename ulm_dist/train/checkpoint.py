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

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ulm_dist.storage import (
    S3Options,
    StorageError,
    StorageFolder,
    copy_to_local,
    files_under,
    open_filesystem,
    write_file,
)

MARKER_NAME = "checkpoint_complete.json"
CHECKPOINT_PREFIX = "checkpoint_"


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


class CheckpointStore(StorageFolder):
    """The checkpoints of one run, `<storage>/<run_name>/checkpoint_<step>/`."""

    def __init__(self, storage: str, run_name: str, s3: S3Options | None = None):
        super().__init__(storage, run_name, s3)

    @property
    def run_path(self) -> str:
        return self.path

    @staticmethod
    def checkpoint_dir_name(step: int) -> str:
        # Zero-padded so that names sort by step.
        return f"{CHECKPOINT_PREFIX}{step:08d}"

    def mark_complete(self, checkpoint_path: str, step: int, **info: Any) -> None:
        """Record that the checkpoint folder holds all its files (call after every upload)."""
        with self.named_errors(f"marking {checkpoint_path.rpartition('/')[2]} complete"):
            files = files_under(self.filesystem, checkpoint_path)
            files.pop(MARKER_NAME, None)
            marker = {"step": step, "files": files, **info}
            # The marker is the last thing written and a single object: a reader sees all or
            # none.
            write_file(
                self.filesystem,
                f"{checkpoint_path}/{MARKER_NAME}",
                json.dumps(marker, indent=1).encode(),
            )

    def scan(self) -> RunCheckpoints:
        """The run's checkpoint folders, sorted into complete and incomplete ones."""
        # One listing of the whole run folder, grouped by checkpoint folder.
        folders: dict[str, dict[str, int]] = {}
        with self.named_errors("listing the checkpoints"):
            for relative, size in files_under(self.filesystem, self.run_path).items():
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
        return open_checkpoint(uri, self.s3)

    def download(self, checkpoint: StoredCheckpoint, destination: Path) -> Path:
        """A local copy of the checkpoint's folder (for readers that need local files)."""
        destination.mkdir(parents=True, exist_ok=True)
        with self.named_errors(f"downloading {checkpoint.path.rpartition('/')[2]}"):
            copy_to_local(self.filesystem, checkpoint.path, destination)
        return destination


def open_checkpoint(uri: str, s3: S3Options) -> StoredCheckpoint:
    """The complete checkpoint at `uri` (local path or s3:// URI), or a StorageError."""
    filesystem, path = open_filesystem(uri, s3)
    checkpoint = _inspect(filesystem, path, files_under(filesystem, path))
    if isinstance(checkpoint, IncompleteCheckpoint):
        raise StorageError(
            f"{uri}: not a complete checkpoint ({checkpoint.reason}; expected a "
            f"{CHECKPOINT_PREFIX}<step> folder holding {MARKER_NAME} and every file it lists); "
            "pick one that a training run printed at its end"
        )
    return checkpoint


@contextmanager
def local_copy(uri: str, s3: S3Options) -> Iterator[tuple[Path, StoredCheckpoint]]:
    """The complete checkpoint at `uri` (see `open_checkpoint`) and a local folder holding it:
    the folder itself when it is local, else a temporary download, deleted on exit."""
    checkpoint = open_checkpoint(uri, s3)
    filesystem, _ = open_filesystem(uri, s3)
    if isinstance(filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path), checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="ulm_checkpoint_") as scratch:
        copy_to_local(filesystem, checkpoint.path, Path(scratch))
        yield Path(scratch), checkpoint


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
