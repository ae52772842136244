"""Streaming samples out of shards: which shards a loader worker reads, decoding, bad input.

Shards are read as streams (a local file, or an S3 object read as it downloads), never
fetched whole first. Bad input does not stop a reader: a sample that fails to decode, a
shard that is missing, and the rest of a truncated or corrupt shard are skipped, logged with
their URL and key, and counted in a `SkipCounter` that the loader reports with its batches.
A shard's manifest count tells how many samples a broken shard lost. Failures that concern
the whole store (missing bucket, credentials, unreachable endpoint) are raised instead.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ulm_dist import storage
from ulm_dist.storage import S3AccessError, S3Options

log = logging.getLogger(__name__)

# A sample's members are `{key}.{field}` (see `ulm_dist/data/__init__.py`); the writer
# (`shards.py`) names them with these.
IMAGE_FIELDS = ("jpg", "jpeg", "png")
LANDMARKS_FIELD = "landmarks.npy"
VISIBLE_FIELD = "visible.npy"
METADATA_FIELD = "json"
T = TypeVar("T")


class SkipCounter:
    """Bad samples skipped since the last `take()`, in this process."""

    def __init__(self) -> None:
        self._count = 0

    def add(self, count: int, reason: str) -> None:
        log.warning("skipping %d sample(s): %s", count, reason)
        self._count += count

    def take(self) -> int:
        count, self._count = self._count, 0
        return count


@dataclass(frozen=True)
class DecodedSample:
    key: str
    image: Image.Image  # RGB, decoded
    landmarks: np.ndarray | None  # (L, 2) float32 pixels of `image`
    visible: np.ndarray | None = None  # (L,) bool when the sample says; None: all visible
    # The sample's metadata (its `.json` member), read with the landmarks: the evaluation
    # protocols group test images by it (Human3.6M's activity).
    metadata: dict[str, Any] = field(default_factory=dict)


def decode_sample(raw: dict[str, Any], with_landmarks: bool) -> DecodedSample:
    """Decodes one sample grouped from a tar; raises ValueError naming what is wrong."""
    field = next((name for name in IMAGE_FIELDS if name in raw), None)
    if field is None:
        fields = sorted(name for name in raw if not name.startswith("__"))
        raise ValueError(f"no image: expected one of {list(IMAGE_FIELDS)}, found {fields}")
    with Image.open(io.BytesIO(raw[field])) as opened:
        image = opened.convert("RGB")
    landmarks = None
    if with_landmarks:
        if LANDMARKS_FIELD not in raw:
            raise ValueError(f"no {LANDMARKS_FIELD}, and landmarks were requested")
        landmarks = np.load(io.BytesIO(raw[LANDMARKS_FIELD]), allow_pickle=False)
        if landmarks.ndim != 2 or landmarks.shape[1] != 2 or not np.isfinite(landmarks).all():
            raise ValueError(
                f"landmarks: expected finite (L, 2) values, got shape {landmarks.shape}"
            )
        landmarks = landmarks.astype(np.float32)
    visible = None
    if with_landmarks and VISIBLE_FIELD in raw:
        visible = np.load(io.BytesIO(raw[VISIBLE_FIELD]), allow_pickle=False)
        if visible.shape != (len(landmarks),):
            raise ValueError(
                f"{VISIBLE_FIELD}: expected one flag per landmark, shape ({len(landmarks)},), "
                f"got {visible.shape}"
            )
        visible = visible.astype(bool)
    metadata = {}
    if with_landmarks and METADATA_FIELD in raw:
        metadata = json.loads(raw[METADATA_FIELD])
        if not isinstance(metadata, dict):
            raise ValueError(f"{METADATA_FIELD}: expected an object, got {type(metadata).__name__}")
    return DecodedSample(raw["__key__"], image, landmarks, visible, metadata)


def read_shard(
    url: str,
    expected: int | None,
    options: S3Options,
    skips: SkipCounter,
    *,
    with_landmarks: bool,
) -> Iterator[DecodedSample]:
    """The good samples of one shard, in order; `expected` is its manifest count, if known."""
    seen = 0
    try:
        stream = storage.open_read(url, options)
    except FileNotFoundError as error:
        skips.add(expected or 1, f"{url}: missing shard ({error})")
        return
    try:
        with stream:
            files = ({**member, "__url__": url} for member in tar_file_iterator(stream))
            for raw in group_by_keys(files):
                seen += 1
                try:
                    sample = decode_sample(raw, with_landmarks)
                except Exception as error:  # PIL and numpy raise many kinds for bad bytes
                    skips.add(1, f"{url}: sample {raw.get('__key__')}: {error}")
                    continue
                yield sample
    except S3AccessError:
        raise
    except Exception as error:  # a truncated or corrupt tar, a dropped connection
        lost = max(1, (expected or 0) - seen)
        skips.add(lost, f"{url}: unreadable after {seen} samples ({type(error).__name__}: {error})")
        return
    if expected is not None and seen < expected:
        skips.add(expected - seen, f"{url}: ended after {seen} of its {expected} samples")


def read_shards(
    urls: Iterable[str],
    counts: dict[str, int],
    options: S3Options,
    skips: SkipCounter,
    *,
    with_landmarks: bool,
    give_up_after: int | None = None,
) -> Iterator[DecodedSample]:
    """The good samples of each shard in turn. With `give_up_after`, raises once that many
    shards in a row gave nothing, rather than spinning forever on an infinite shard stream."""
    barren = 0
    for url in urls:
        produced = False
        for sample in read_shard(
            url, counts.get(url), options, skips, with_landmarks=with_landmarks
        ):
            produced = True
            yield sample
        barren = 0 if produced else barren + 1
        if give_up_after is not None and barren >= give_up_after:
            raise RuntimeError(
                f"{barren} shards in a row held no readable sample (the last: {url}); "
                "check the data set (see the warnings above) and its manifest"
            )


def shards_for_worker(
    urls: Sequence[str],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    seed: int | None,
) -> list[str]:
    """This worker's share of an epoch's shards: every (rank, worker) pair takes a disjoint
    slice of one order, shuffled by `seed` (the same on every rank) unless it is None."""
    order = list(urls)
    if seed is not None:
        order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    consumer = rank * num_workers + worker
    return order[consumer :: world_size * num_workers]


def resampled_shards(urls: Sequence[str], rng: np.random.Generator) -> Iterator[str]:
    """Shards drawn at random with replacement, forever (open_clip's resampled mode)."""
    while True:
        yield urls[rng.integers(len(urls))]


def unpaired(
    items: Iterable[T], buffer_size: int, rng: np.random.Generator
) -> Iterator[tuple[T, T]]:
    """Shuffles `items` through a buffer and pairs each with another item from the buffer.

    Every item comes out exactly once as the first of a pair; its partner is a different item
    drawn from the buffer (the last item is paired with the one before it). A lone item has no
    partner and gives no pair.
    """
    buffer: list[T] = []
    previous: list[T] = []
    for item in items:
        buffer.append(item)
        if len(buffer) > buffer_size:
            yield _pop_pair(buffer, previous, rng)
    while len(buffer) > 1:
        yield _pop_pair(buffer, previous, rng)
    if buffer and previous:
        yield buffer.pop(), previous[0]


def _pop_pair(buffer: list[T], previous: list[T], rng: np.random.Generator) -> tuple[T, T]:
    index = rng.integers(len(buffer))
    buffer[index], buffer[-1] = buffer[-1], buffer[index]
    first = buffer.pop()
    previous[:] = [first]
    return first, buffer[rng.integers(len(buffer))]
