"""Writing WebDataset shards: encoding samples, one tar per shard, shards in parallel.

A shard is a plain tar whose members are `{key}.{field}` (the sample format is described in
`ulm_dist/data/__init__.py`). Tars are byte-for-byte reproducible (fixed member order,
zero mtimes and owners), so the same seed and options give the same checksums.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from ulm_dist import storage
from ulm_dist.data.manifest import ShardInfo
from ulm_dist.data.reader import LANDMARKS_FIELD, METADATA_FIELD, VISIBLE_FIELD
from ulm_dist.storage import S3Options

_TAR_BLOCK = 512


@dataclass(frozen=True)
class Sample:
    key: str  # unique in its split; no "." (WebDataset splits the key at the first dot)
    image: np.ndarray  # (H, W, 3) uint8
    landmarks: np.ndarray | None = None  # (L, 2) float32, pixels of `image`, (x, y)
    metadata: dict[str, Any] = field(default_factory=dict)
    # (L,) bool, which landmarks are annotated as visible (CUB's parts); None: all of them.
    visible: np.ndarray | None = None


@dataclass(frozen=True)
class Encoding:
    image_format: Literal["jpg", "png"] = "jpg"
    quality: int = 95  # JPEG quality, 1-100; ignored for PNG


# Makes the samples of one shard; a picklable callable (functools.partial of a module-level
# function) so that shards can be made in worker processes.
ShardJob = Callable[[], list[Sample]]


def encode_sample(sample: Sample, encoding: Encoding) -> list[tuple[str, bytes]]:
    """The tar members (name, bytes) of one sample."""
    if "." in sample.key.rsplit("/", 1)[-1]:
        raise ValueError(f"sample key {sample.key!r}: expected no '.' in its last path part")
    buffer = io.BytesIO()
    picture = Image.fromarray(sample.image)
    if encoding.image_format == "jpg":
        picture.save(buffer, format="JPEG", quality=encoding.quality)
    else:
        picture.save(buffer, format="PNG")
    members = [(f"{sample.key}.{encoding.image_format}", buffer.getvalue())]
    if sample.landmarks is not None:
        array = io.BytesIO()
        np.save(array, np.asarray(sample.landmarks, np.float32), allow_pickle=False)
        members.append((f"{sample.key}.{LANDMARKS_FIELD}", array.getvalue()))
    if sample.visible is not None:
        array = io.BytesIO()
        np.save(array, np.asarray(sample.visible, np.bool_), allow_pickle=False)
        members.append((f"{sample.key}.{VISIBLE_FIELD}", array.getvalue()))
    if sample.metadata:
        text = json.dumps(sample.metadata, sort_keys=True).encode()
        members.append((f"{sample.key}.{METADATA_FIELD}", text))
    return members


def samples_per_shard(probe: Sequence[Sample], encoding: Encoding, target_bytes: int) -> int:
    """How many samples like `probe` fill a shard of about `target_bytes`."""
    if not probe:
        raise ValueError("samples_per_shard: expected at least one probe sample, got none")
    sizes = [
        sum(_TAR_BLOCK + _round_up(len(data)) for _, data in encode_sample(sample, encoding))
        for sample in probe
    ]
    return max(1, int(target_bytes / np.mean(sizes)))


def _round_up(size: int) -> int:
    return -(-size // _TAR_BLOCK) * _TAR_BLOCK


def write_shard(
    samples: Sequence[Sample], folder: str, name: str, encoding: Encoding, options: S3Options
) -> ShardInfo:
    """Writes `samples` as the tar `folder/name`; returns its manifest row (url = name)."""
    url = storage.join(folder, name)
    handle, path = tempfile.mkstemp(dir=storage.staging_folder(url), suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as stream, tarfile.open(fileobj=stream, mode="w") as tar:
            for sample in samples:
                for member, data in encode_sample(sample, encoding):
                    entry = tarfile.TarInfo(member)
                    entry.size, entry.mode = len(data), 0o444
                    tar.addfile(entry, io.BytesIO(data))
        row = ShardInfo(name, len(samples), os.path.getsize(path), _sha256(path))
        storage.move_file(path, url, options)
    finally:
        if os.path.exists(path):  # a failed write or upload leaves no partial file behind
            os.unlink(path)
    return row


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def _run_job(
    job: ShardJob, folder: str, name: str, encoding: Encoding, options: S3Options
) -> ShardInfo:
    return write_shard(job(), folder, name, encoding, options)


def write_shards(
    jobs: Sequence[ShardJob],
    folder: str,
    prefix: str,
    encoding: Encoding,
    options: S3Options,
    *,
    total_samples: int,
    workers: int,
    progress: bool,
) -> list[ShardInfo]:
    """Runs the jobs into `folder/{prefix}-000000.tar`, ... over `workers` processes (in this
    process when 1), with a progress bar counting samples. Rows come back in shard order."""
    names = [f"{prefix}-{index:06d}.tar" for index in range(len(jobs))]
    bar = tqdm(total=total_samples, unit="img", desc=f"writing {prefix}", disable=not progress)
    with bar:
        if workers <= 1 or len(jobs) <= 1:
            rows = []
            for job, name in zip(jobs, names, strict=True):
                rows.append(_run_job(job, folder, name, encoding, options))
                bar.update(rows[-1].samples)
            return rows
        # Spawned, not forked: the caller may be a threaded process (Ray, a data loader).
        context = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context)
        with pool:
            futures = {
                pool.submit(_run_job, job, folder, name, encoding, options): index
                for index, (job, name) in enumerate(zip(jobs, names, strict=True))
            }
            rows_by_index = {}
            for future in concurrent.futures.as_completed(futures):
                rows_by_index[futures[future]] = future.result()
                bar.update(rows_by_index[futures[future]].samples)
        return [rows_by_index[index] for index in range(len(jobs))]
