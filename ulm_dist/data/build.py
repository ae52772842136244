"""Building data sets: an image folder or the synthetic generator, into split folders of shards.

A build writes `DEST/{split}/{split}-000000.tar, ...` and `DEST/{split}/manifest.parquet` for
each split; DEST is a local folder or an s3://bucket/prefix. `ensure_synthetic_dataset` is the
cached, atomic variant the training driver calls before its workers start.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ulm_dist import storage
from ulm_dist.config import DataConfig
from ulm_dist.data import synthetic
from ulm_dist.data.image_folder import (
    LandmarkTable,
    folder_items,
    load_items,
    read_landmark_table,
    split_items,
)
from ulm_dist.data.layouts import LandmarkLayout, LandmarkReduction
from ulm_dist.data.manifest import MANIFEST_NAME, DatasetSummary, Manifest, write_manifest
from ulm_dist.data.resolve import ShardSet, resolve_shards
from ulm_dist.data.shards import Encoding, Sample, ShardJob, samples_per_shard, write_shards
from ulm_dist.storage import S3Options

# Samples read to estimate the encoded size of one, when shards are sized in bytes.
_PROBE_SAMPLES = 16
# Below this many images, starting worker processes costs more than it saves.
_PARALLEL_FROM_SAMPLES = 10_000
# The fixed ids of the synthetic splits, part of each shard's seed.
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class WriteOptions:
    """How shards are written, whatever their source."""

    encoding: Encoding = Encoding()
    s3: S3Options = S3Options()
    workers: int = 1
    progress: bool = True


def build_from_folder(
    source: str | Path,
    dest: str,
    *,
    table: str | Path | None,
    image_size: int,
    shard_bytes: int | None = 64 * 2**20,
    shard_samples: int | None = None,
    fractions: dict[str, float] | None = None,
    group_by: str | None = None,
    seed: int = 0,
    layout: LandmarkLayout | None = None,
    reduction: LandmarkReduction | None = None,
    write: WriteOptions = WriteOptions(),
) -> dict[str, Manifest]:
    """Shards an image folder (see `image_folder`) in a random (seeded) order; `shard_samples`,
    if given, overrides `shard_bytes`. `fractions` (e.g. {"val": 0.05, "test": 0.1}) splits
    off parts at random, whole `group_by` groups at a time; the rest is "train". A
    `reduction` (e.g. 68 points to MAFL's 5) replaces the table's landmarks and `layout`."""
    landmarks = read_landmark_table(table) if table is not None else None
    if reduction is not None:
        landmarks = _reduce_landmarks(landmarks, reduction)
        layout = reduction.layout
    items = folder_items(source, landmarks)
    num_landmarks = landmarks.landmarks.shape[1] if landmarks is not None else 0
    if layout is not None and layout.num_landmarks != num_landmarks:
        raise ValueError(
            f"layout with {layout.num_landmarks} landmarks given for a table with {num_landmarks}"
        )
    if shard_samples is None:
        if shard_bytes is None:
            raise ValueError("give the shard size as shard_bytes or shard_samples, got neither")
        probe = load_items(items[:_PROBE_SAMPLES], image_size)
        shard_samples = samples_per_shard(probe, write.encoding, shard_bytes)
    manifests = {}
    for split, members in split_items(items, fractions or {}, group_by=group_by, seed=seed).items():
        # Shards mix the whole split: a reader's shuffle buffer only mixes a few shards, and
        # folders tend to be sorted by person or by video.
        members = [members[i] for i in np.random.default_rng(seed).permutation(len(members))]
        jobs: list[ShardJob] = [
            functools.partial(load_items, members[start : start + shard_samples], image_size)
            for start in range(0, len(members), shard_samples)
        ]
        summary = DatasetSummary(
            split=split,
            image_size=image_size,
            image_format=write.encoding.image_format,
            num_landmarks=num_landmarks,
            source=f"image folder {Path(source).resolve()}, landmarks table {table}",
            landmark_names=tuple(landmarks.landmark_names) if landmarks else (),
            layout=layout,
            metadata_fields=tuple(landmarks.metadata) if landmarks else (),
        )
        manifests[split] = write_split(jobs, len(members), dest, summary, write)
    return manifests


def _reduce_landmarks(table: LandmarkTable | None, reduction: LandmarkReduction) -> LandmarkTable:
    found = table.landmarks.shape[1] if table is not None else 0
    if table is None or found != reduction.source_count:
        raise ValueError(
            f"reducing landmarks to {len(reduction.names)} points needs a table with "
            f"{reduction.source_count} landmarks, got {found}; give --landmarks with x0, y0 .. "
            f"x{reduction.source_count - 1}, y{reduction.source_count - 1} columns"
        )
    points = reduction.reduce(table.landmarks).astype(np.float32)
    return dataclasses.replace(table, landmarks=points, landmark_names=list(reduction.names))


def build_synthetic(
    dest: str,
    *,
    split_samples: dict[str, int],
    image_size: int,
    seed: int = 0,
    shard_samples: int = 1000,
    write: WriteOptions = WriteOptions(),
) -> dict[str, Manifest]:
    """Writes `split_samples[split]` synthetic images per split ("train", "val", "test").

    Each shard draws from its own seed (seed, split, shard index), so the data set depends on
    `seed`, the split sizes, `image_size` and `shard_samples`, not on the number of workers.
    """
    unknown = sorted(set(split_samples) - set(_SPLIT_IDS))
    if unknown:
        raise ValueError(f"synthetic splits: expected names in {sorted(_SPLIT_IDS)}, got {unknown}")
    manifests = {}
    for split, count in split_samples.items():
        jobs: list[ShardJob] = [
            functools.partial(
                _synthetic_shard,
                [seed, _SPLIT_IDS[split], index],
                split,
                start,
                min(shard_samples, count - start),
                image_size,
            )
            for index, start in enumerate(range(0, count, shard_samples))
        ]
        summary = DatasetSummary(
            split=split,
            image_size=image_size,
            image_format=write.encoding.image_format,
            num_landmarks=len(synthetic.LANDMARK_NAMES),
            source=f"synthetic generator v{synthetic.GENERATOR_VERSION}, seed {seed}",
            landmark_names=synthetic.LANDMARK_NAMES,
            layout=synthetic.SYNTHETIC_LAYOUT,
        )
        manifests[split] = write_split(jobs, count, dest, summary, write)
    return manifests


def _synthetic_shard(
    seed: list[int], split: str, start: int, count: int, size: int
) -> list[Sample]:
    images, landmarks = synthetic.generate(count, size, np.random.default_rng(seed))
    return [
        Sample(f"{split}_{start + i:08d}", image, points)
        for i, (image, points) in enumerate(zip(images, landmarks, strict=True))
    ]


def write_split(
    jobs: list[ShardJob], count: int, dest: str, summary: DatasetSummary, write: WriteOptions
) -> Manifest:
    """Runs the shard jobs of one split into DEST/{split}/, then writes its manifest (last, so
    that a manifest never lists a missing shard). Every builder ends here."""
    folder = storage.join(dest, summary.split)
    rows = write_shards(
        jobs,
        folder,
        summary.split,
        write.encoding,
        write.s3,
        total_samples=count,
        workers=write.workers,
        progress=write.progress,
    )
    write_manifest(folder, Manifest(tuple(rows), summary), write.s3)
    # As `read_manifest` gives it: shard urls absolute.
    shards = (dataclasses.replace(row, url=storage.join(folder, row.url)) for row in rows)
    return Manifest(tuple(shards), summary)


def synthetic_split_samples(train_samples: int) -> dict[str, int]:
    """Split sizes of a synthetic set: val and test a tenth of train each, at least 64."""
    held_out = max(64, train_samples // 10)
    return {"train": train_samples, "val": held_out, "test": held_out}


def synthetic_shard_samples(train_samples: int) -> int:
    """At least 8 train shards (enough to split over ranks and loader workers), at most 1000
    samples per shard."""
    return max(16, min(1000, math.ceil(train_samples / 8)))


def prepare_shards(data: DataConfig, spec: str, split: str, *, image_size: int) -> ShardSet:
    """`resolve_shards`, with the synthetic set generated first when `spec` is `synthetic`.
    For the driver and the commands, before any worker reads it from `data.cache_dir`."""
    if spec == "synthetic":
        ensure_synthetic_dataset(
            data.cache_dir, data.synthetic_samples, image_size, data.synthetic_seed
        )
    return resolve_shards(data, spec, split, image_size=image_size)


def ensure_synthetic_dataset(
    cache_dir: str | Path, num_samples: int, image_size: int, seed: int = 0
) -> Path:
    """The folder of a synthetic set (train/val/test shards + manifests), built on first use.

    Idempotent and safe to call concurrently: a finished set is never rebuilt, a set is built
    in a temporary folder renamed into place only when complete, and a lock makes a second
    caller wait for the first instead of building it twice.
    """
    cache_dir = Path(cache_dir)
    folder = synthetic.dataset_folder(cache_dir, num_samples, image_size, seed)
    if (folder / "train" / MANIFEST_NAME).is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".synthetic.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "train" / MANIFEST_NAME).is_file():
            return folder
        staging = cache_dir / f".{folder.name}.{uuid.uuid4().hex}.partial"
        splits = synthetic_split_samples(num_samples)
        try:
            build_synthetic(
                str(staging),
                split_samples=splits,
                image_size=image_size,
                seed=seed,
                shard_samples=synthetic_shard_samples(num_samples),
                write=WriteOptions(workers=_workers_for(sum(splits.values()))),
            )
            os.rename(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _workers_for(samples: int) -> int:
    return 1 if samples < _PARALLEL_FROM_SAMPLES else os.cpu_count() or 1
