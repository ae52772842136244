"""Torch data loaders over shards: image pairs for training, annotated images for evaluation.

Each loader worker process streams its own shards (`reader.py`), decodes and augments on the
CPU (`augment.py`) and yields whole batches, each carrying `skipped`: the bad samples that
worker skipped since its previous batch, so that the counts survive multiprocessing.

Two ways to cut the data into epochs:
- resampled (training): every worker draws shards at random with replacement, forever; an
  epoch is `epoch_samples` pairs over all ranks (or never ends, without it), so every rank
  yields the same number of batches whatever the shard sizes, and none waits on another;
- finite: the shards are split across ranks and workers (each shard read by exactly one),
  so every sample is seen once per epoch; ranks may get different batch counts.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ulm_dist.config import DataConfig
from ulm_dist.data.augment import (
    AugmentOptions,
    View,
    crop_box,
    jitter_colours,
    random_view,
    square_view,
    warped_view,
)
from ulm_dist.data.reader import (
    DecodedSample,
    SkipCounter,
    read_shards,
    resampled_shards,
    shards_for_worker,
    unpaired,
)
from ulm_dist.data.resolve import ShardSet
from ulm_dist.storage import s3_options

log = logging.getLogger(__name__)


class _ShardStream(IterableDataset):
    """What both loaders share: this worker's shards, read into decoded samples."""

    def __init__(
        self,
        data: DataConfig,
        shards: ShardSet,
        image_size: int,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        resampled: bool,
        with_landmarks: bool,
    ) -> None:
        if not shards.urls:
            raise ValueError("expected at least one shard URL, got none")
        if with_landmarks:
            shards.require_landmarks("an annotated loader", "evaluation")
        self.shards = shards
        self.options = s3_options(data)
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled = resampled
        self.with_landmarks = with_landmarks
        self.epoch = 0  # set by EpochLoader before each epoch's workers start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        skips = SkipCounter()
        urls: Iterable[str]
        if self.resampled:
            urls = resampled_shards(self.shards.urls, rng)
        else:
            urls = shards_for_worker(
                self.shards.urls,
                rank=self.rank,
                world_size=self.world_size,
                worker=worker,
                num_workers=num_workers,
                seed=self._shard_order_seed(),
            )
        samples = read_shards(
            urls,
            self.shards.sample_counts,
            self.options,
            skips,
            with_landmarks=self.with_landmarks,
            # Only an endless stream needs a way out of an all-broken data set.
            give_up_after=max(16, 3 * len(self.shards.urls)) if self.resampled else None,
        )
        return _batches(self._items(samples, rng), self.batch_size, skips)

    def _shard_order_seed(self) -> Sequence[int] | None:
        return [self.seed, self.epoch]

    def _items(
        self, samples: Iterator[DecodedSample], rng: np.random.Generator
    ) -> Iterator[dict[str, Any]]:
        raise NotImplementedError


class _PairStream(_ShardStream):
    def __init__(self, data: DataConfig, shards: ShardSet, *args: Any, **kwargs: Any) -> None:
        super().__init__(data, shards, *args, **kwargs)
        self.augment = AugmentOptions.from_config(data)
        self.warped = data.pairs == "warped"
        self.buffer = data.shuffle_buffer
        layout = shards.summary.layout if shards.summary else None
        self.flip_permutation = layout.flip_permutation if layout else None
        if self.with_landmarks and self.augment.flip_probability > 0 and layout is None:
            raise ValueError(
                "data.flip_probability > 0 with landmarks needs the shards' flip permutation, "
                "but their manifest has no landmark layout; set data.flip_probability=0 or "
                "rebuild the shards with --layout"
            )

    def _items(
        self, samples: Iterator[DecodedSample], rng: np.random.Generator
    ) -> Iterator[dict[str, Any]]:
        for first, partner in unpaired(samples, self.buffer, rng):
            view = self._view(first, rng)
            view_i = View(jitter_colours(view.image, self.augment, rng), view.landmarks)
            if self.warped:
                # One jitter for both views, then the warp: a colour difference between them
                # would be reconstruction error that no landmark can remove (IMM's pairs
                # differ only by the warp).
                partner, view_j = first, warped_view(view_i, self.augment, rng)
            else:
                view = self._view(partner, rng)
                view_j = View(jitter_colours(view.image, self.augment, rng), view.landmarks)
            item = {
                "image_i": view_i.image,
                "image_j": view_j.image,
                "key_i": first.key,
                "key_j": partner.key,
            }
            if self.with_landmarks:
                item.update(landmarks_i=view_i.landmarks, landmarks_j=view_j.landmarks)
            yield item

    def _view(self, sample: DecodedSample, rng: np.random.Generator) -> View:
        return random_view(
            sample.image,
            sample.landmarks,
            self.image_size,
            self.augment,
            rng,
            self.flip_permutation,
        )


class _AnnotatedStream(_ShardStream):
    def _shard_order_seed(self) -> Sequence[int] | None:
        return None  # manifest order: evaluation is deterministic

    def _items(
        self, samples: Iterator[DecodedSample], rng: np.random.Generator
    ) -> Iterator[dict[str, Any]]:
        for sample in samples:
            box = crop_box(sample.image.width, sample.image.height, 1.0, None)
            view = square_view(sample.image, sample.landmarks, self.image_size, box)
            visible = sample.visible
            if visible is None:
                visible = np.ones(len(view.landmarks), bool)
            yield {
                "image": view.image,
                "landmarks": view.landmarks,
                "visible": visible,
                "key": sample.key,
                "metadata": sample.metadata,
            }


def _batches(
    items: Iterator[dict[str, Any]], batch_size: int, skips: SkipCounter
) -> Iterator[dict[str, Any]]:
    """Stacks items into batches. A full batch goes out only when the next item is ready (or
    the stream ends), so skips met on the way, up to the very end, ride with a batch."""
    pending: list[dict[str, Any]] = []
    for item in items:
        if len(pending) == batch_size:
            yield _collate(pending, skips.take())
            pending = []
        pending.append(item)
    if pending:
        yield _collate(pending, skips.take())


def _collate(items: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    batch: dict[str, Any] = {}
    for name, value in items[0].items():
        values = [item[name] for item in items]
        batch[name] = (
            torch.from_numpy(np.stack(values)) if isinstance(value, np.ndarray) else values
        )
    batch["skipped"] = torch.tensor(skipped, dtype=torch.int64)
    return batch


class EpochLoader:
    """Iterating it gives one epoch of batches: `batches_per_epoch` of them when set, else
    until the shards run out (finite) or forever (resampled). Each epoch reshuffles."""

    def __init__(
        self, stream: _ShardStream, num_workers: int, batches_per_epoch: int | None
    ) -> None:
        self.stream = stream
        self.batches_per_epoch = batches_per_epoch
        self._loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context=_worker_context() if num_workers else None,
        )
        self._epoch = 0
        consumers = stream.world_size * max(1, num_workers)
        if not stream.resampled and len(stream.shards.urls) < consumers:
            log.warning(
                "%d shards for %d ranks x %d loader workers: some workers get none; write "
                "smaller shards to use them all",
                len(stream.shards.urls),
                stream.world_size,
                max(1, num_workers),
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Workers copy the stream when the iterator starts, so the epoch is set before that.
        self.stream.epoch = self._epoch
        self._epoch += 1
        # Forked workers would see the environment as it is now (credentials, endpoints);
        # the fork server's see it as it was when the server started, unless handed it.
        self._loader.worker_init_fn = functools.partial(_adopt_environment, dict(os.environ))
        batches = iter(self._loader)
        if self.batches_per_epoch is None:
            return batches
        return itertools.islice(batches, self.batches_per_epoch)


def _worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers start: from a fork server, not by forking the caller.

    A Ray Train worker runs gRPC, gloo and Ray's own threads; a child forked from it can
    inherit a lock that one of them held, and hang on its first batch while the other ranks
    wait in a collective (Ray's data-loading guide gives the same advice). The server is a
    clean process with torch and this module already imported: on 2 cores a loader's first
    batch came 1.7 s after its start the first time and 0.4 s after it from then on (0.08 s
    with fork), which a loader rebuilt at every checkpoint can afford. As with spawn, the
    workers import the caller's main script: scripts that use loaders need a main guard."""
    context = multiprocessing.get_context("forkserver")
    # Only the server's first start reads the list; by default it would import the caller's
    # __main__, which in a Ray worker is Ray's own worker script.
    context.set_forkserver_preload(["torch", __name__])
    return context


def _adopt_environment(environment: dict[str, str], _worker_id: int) -> None:
    """A loader worker's first act: take on the environment its loader started in."""
    os.environ.clear()
    os.environ.update(environment)


def _as_shard_set(urls: ShardSet | Sequence[str]) -> ShardSet:
    return urls if isinstance(urls, ShardSet) else ShardSet(tuple(urls))


def make_pair_loader(
    data: DataConfig,
    urls: ShardSet | Sequence[str],
    image_size: int,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    seed: int,
    resampled: bool = True,
    epoch_samples: int | None = None,
    with_landmarks: bool = False,
) -> EpochLoader:
    """Batches of unpaired pairs for training (see the module docstring for epochs).

    `urls`: a `ShardSet` from `resolve_shards` (best: it carries sample counts and the landmark
    layout) or plain shard URLs. `batch_size`: pairs per batch on this rank. `seed`: changes
    the shuffling; pass seed + step when resuming so that the order is not replayed.
    `epoch_samples`: pairs per epoch over all ranks (each rank yields
    ceil(epoch_samples / (batch_size * world_size)) batches).

    A batch holds `image_i`, `image_j` (B, 3, S, S) float32 in [0, 1] (two different images,
    or with data.pairs=warped, an image and its warp), `key_i`, `key_j` (lists of sample keys),
    `landmarks_i`, `landmarks_j` (B, L, 2) in [-1, 1] when `with_landmarks`, and `skipped`.
    """
    shards = _as_shard_set(urls)
    stream = _PairStream(
        data,
        shards,
        image_size,
        batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        resampled=resampled,
        with_landmarks=with_landmarks,
    )
    per_epoch = None
    if epoch_samples is not None:
        per_epoch = math.ceil(epoch_samples / (batch_size * world_size))
    return EpochLoader(stream, data.num_workers, per_epoch)


def make_annotated_loader(
    data: DataConfig,
    urls: ShardSet | Sequence[str],
    image_size: int,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> EpochLoader:
    """Batches of annotated images for evaluation, in a fixed order, each sample once: `image`
    (B, 3, S, S) float32 in [0, 1] (centre square, resized, no augmentation), `landmarks`
    (B, L, 2) in [-1, 1], `visible` (B, L) bool (all True unless the shards flag invisible
    landmarks), `key`, `metadata` (the samples' metadata dicts) and `skipped`."""
    stream = _AnnotatedStream(
        data,
        _as_shard_set(urls),
        image_size,
        batch_size,
        rank=rank,
        world_size=world_size,
        seed=0,
        resampled=False,
        with_landmarks=True,
    )
    return EpochLoader(stream, data.num_workers, None)
