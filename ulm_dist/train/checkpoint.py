"""What a checkpoint holds, and how it is written, restored, marked complete and found.

A run owns `<train.storage>/<run_name>/` (a local folder or `s3://bucket/prefix`, through
`storage.StorageFolder`, which Ray Train uploads through too):

    config.yaml                     the run's resolved config (RUN_CONFIG_NAME)
    checkpoint_<step>/              one per reported checkpoint, zero-padded so names sort
        engine/                     DeepSpeed's state: weights, optimizer, LR schedule, sharded
                                    per worker as the engine shards them (ENGINE_TAG)
        rng/rank_<r>.pt             each worker's Python, NumPy, torch (and CUDA) RNG states
        train_state.json            step, samples seen, skipped samples, world size and the
                                    resolved config, URL credentials redacted (TRAIN_STATE_NAME)
        val_<name>.png              the step's evaluation pictures, TensorBoard tag val/<name>
        checkpoint_complete.json    the completion marker (MARKER_NAME), written last

Each worker writes its part into a local folder (`write_checkpoint`) that Ray uploads; once
every worker's upload is done, the driver's reporter writes the marker (`mark_complete`),
listing the checkpoint's files and sizes and its `val/` metrics. A checkpoint counts only if
its marker is there, parses, and every listed file is present at its size, so one half
uploaded (a worker died mid-way), half deleted (pruning interrupted) or tampered with is
never taken for the latest: `CheckpointStore.latest` is the one answer to "where does this
run stand", for resuming (`resume_checkpoint`), pruning (`prune`) and the tools that read a
run (evaluate, export: `local_copy`, `read_train_state`, `read_learner_weights`).
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs
import torch

from ulm_dist.config import Config
from ulm_dist.redaction import redacted_config
from ulm_dist.storage import (
    S3Options,
    StorageError,
    StorageFolder,
    copy_to_local,
    files_under,
    open_filesystem,
    write_file,
)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

CHECKPOINT_PREFIX = "checkpoint_"
RUN_CONFIG_NAME = "config.yaml"
ENGINE_TAG = "engine"
RNG_FOLDER = "rng"
TRAIN_STATE_NAME = "train_state.json"
PICTURE_PREFIX = "val_"
MARKER_NAME = "checkpoint_complete.json"
# train.resume values that name no checkpoint.
RESUME_KEYWORDS = ("auto", "never")


@dataclass
class TrainState:
    """Where training stands beyond the engine's own state; the same on every worker."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # image pairs trained on, all workers together
    skipped_total: int = 0  # bad samples the data loaders skipped, all workers together


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

    def write_config(self, text: str) -> str:
        """The run's resolved config, beside its checkpoints; returns its URI."""
        return self.write_text(RUN_CONFIG_NAME, text)

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


def resume_checkpoint(store: CheckpointStore, resume: str) -> StoredCheckpoint | None:
    """The checkpoint a run starts from: its newest complete one, else the one `resume`
    (`train.resume`) names while the run has none, else None (a fresh start). The driver
    checks and announces it before the workers start; each worker then loads it."""
    start = store.latest()
    if start is None and resume not in RESUME_KEYWORDS:
        start = store.open_checkpoint(resume)
    return start


def picture_file(tag: str) -> str:
    """The file in a checkpoint of the picture with TensorBoard tag `val/<name>`."""
    return f"{PICTURE_PREFIX}{tag.removeprefix('val/')}.png"


def picture_tag(file_name: str) -> str | None:
    """The TensorBoard tag of a checkpoint's picture file, None for other files."""
    if file_name.startswith(PICTURE_PREFIX) and file_name.endswith(".png"):
        return f"val/{file_name.removeprefix(PICTURE_PREFIX).removesuffix('.png')}"
    return None


def write_checkpoint(
    folder: Path,
    engine: DeepSpeedEngine,
    state: TrainState,
    cfg: Config,
    rank: int,
    world_size: int,
    pictures: dict[str, bytes],
) -> None:
    """Write this worker's part of a checkpoint into the local `folder` (a collective: the
    engine's state is written by every worker). `pictures`: PNGs by TensorBoard tag, kept
    by rank 0."""
    engine.save_checkpoint(str(folder), tag=ENGINE_TAG, save_latest=False)
    (folder / RNG_FOLDER).mkdir()
    torch.save(_rng_states(), folder / RNG_FOLDER / f"rank_{rank:05d}.pt")
    if rank == 0:
        write_train_state(folder, state, cfg, world_size)
        for tag, png in pictures.items():
            (folder / picture_file(tag)).write_bytes(png)


def write_train_state(folder: Path, state: TrainState, cfg: Config, world_size: int) -> None:
    """The checkpoint's `train_state.json`: where training stands, and the config that
    `load_trained` rebuilds the learner from (URL credentials redacted: checkpoints are
    copied and shared; the workers keep the real config)."""
    saved = {**asdict(state), "world_size": world_size, "config": redacted_config(cfg)}
    (folder / TRAIN_STATE_NAME).write_text(json.dumps(saved, indent=1))


def restore_checkpoint(engine: DeepSpeedEngine, folder: Path, rank: int) -> TrainState:
    """Load what `write_checkpoint` wrote into the engine and this worker's RNGs, with the
    same number of workers (a collective); returns where training stands."""
    loaded_from, _ = engine.load_checkpoint(str(folder), tag=ENGINE_TAG)
    if loaded_from is None:
        raise FileNotFoundError(
            f"{folder}: expected DeepSpeed state in {folder / ENGINE_TAG}, found none; "
            "is this a checkpoint written by ulm_dist.train?"
        )
    saved = json.loads((folder / TRAIN_STATE_NAME).read_text())
    _set_rng_states(torch.load(folder / RNG_FOLDER / f"rank_{rank:05d}.pt", weights_only=False))
    return TrainState(
        step=saved["step"],
        samples_seen=saved["samples_seen"],
        skipped_total=saved["skipped_total"],
    )


def read_train_state(folder: Path, uri: str) -> dict[str, Any]:
    """The saved `train_state.json` of the local checkpoint copy `folder` (read from `uri`)."""
    state_file = folder / TRAIN_STATE_NAME
    if not state_file.exists():
        raise StorageError(
            f"{uri}: has no {TRAIN_STATE_NAME}; is this a checkpoint written by ulm_dist.train?"
        )
    return json.loads(state_file.read_text())


def read_learner_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The learner's full fp32 state dict from a local checkpoint folder, without DeepSpeed's
    runtime: sharded ZeRO state is gathered, bf16/fp16 weights come from the fp32 master copy.
    Load it with `build_learner(...).load_state_dict(weights)`.
    """
    # Imported on use: importing DeepSpeed probes for an accelerator (and warns on CPUs).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine_folder = Path(folder) / ENGINE_TAG
    if any(engine_folder.glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=ENGINE_TAG)
    # Without ZeRO (stage 0, fp32) the whole module sits in rank 0's model-states file.
    states = torch.load(engine_folder / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]


def _rng_states() -> dict[str, Any]:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
