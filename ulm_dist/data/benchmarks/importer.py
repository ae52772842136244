"""What every benchmark importer shares: the items it collects, how an item's image is cut
and resized into a stored square (landmarks following), and writing the splits as shards.

An importer (`celeba_mafl.py`, `aflw.py`, `cub.py`, `h36m.py`) reads its publisher's files
into a `BenchmarkImport`: per split, the items whose image exists, and the images the
annotations name that are missing (skipped and counted, never silently dropped). The images
are only opened when the shards are written, in `write_benchmark`, through the shard writer
every builder uses (`build.write_split`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from ulm_dist.data.build import WriteOptions, write_split
from ulm_dist.data.layouts import LandmarkLayout
from ulm_dist.data.manifest import DatasetSummary, Manifest
from ulm_dist.data.shards import Sample, ShardJob

# The share of a split that becomes its "val" split (IMM's rule: the last tenth of the
# regressor's training images), for choosing checkpoints without looking at the test split.
VAL_FRACTION = 0.1
T = TypeVar("T")


@dataclass(frozen=True)
class Region:
    """The rectangle (left, top, right, bottom) of an original image that becomes the stored
    square: in fractions of the image's width and height when `relative`, else in pixels,
    where it may reach outside the image (that part is black)."""

    left: float
    top: float
    right: float
    bottom: float
    relative: bool

    def in_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        if not self.relative:
            return self.left, self.top, self.right, self.bottom
        return self.left * width, self.top * height, self.right * width, self.bottom * height


WHOLE_IMAGE = Region(0.0, 0.0, 1.0, 1.0, relative=True)


@dataclass(frozen=True)
class ImportOptions:
    """The options only some importers take; each reads those that concern it."""

    crop_fraction: float = 0.8  # celeba-mafl: centre share of the square-resized image
    frame_step: int = 1  # h36m: every n-th frame of each sequence
    all_joints: bool = False  # h36m: keep all 32 joints instead of the 17 evaluated
    keep_background: bool = False  # h36m: do not multiply the masks in


@dataclass(frozen=True)
class BenchmarkItem:
    key: str  # unique within its split, no "."
    image: Path
    landmarks: np.ndarray  # (L, 2) float (x, y) in the frame `annotated_size` (or pixels)
    region: Region
    # (width, height) of the frame the landmarks are given in, when it is not the image's own
    # pixels: AFLW's `hw`, or (1, 1) for Human3.6M's coordinates in [0, 1].
    annotated_size: tuple[float, float] | None = None
    # Added to the annotated coordinates (in their own frame) to reach the shard convention,
    # where the image spans [0, size] and pixel i's centre is at i + 0.5: +0.5 for 0-based
    # pixel indices, -0.5 for 1-based ones, 0 for coordinates already continuous. Each
    # importer's PIXEL_ORIGIN, with where its publisher's convention was checked.
    origin_offset: float = 0.0
    visible: np.ndarray | None = None  # (L,) bool
    mask: Path | None = None  # a background mask (0 background, 255 subject), multiplied in
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchmarkImport:
    """A benchmark as its importer read it, before any image is opened."""

    name: str
    splits: dict[str, list[BenchmarkItem]]
    missing: dict[str, list[str]]  # per split, the image files the annotations name, absent
    layout: LandmarkLayout
    landmark_names: tuple[str, ...]
    source: str
    metadata_fields: tuple[str, ...] = ()

    def summary_line(self) -> str:
        counts = ", ".join(f"{split} {len(items)}" for split, items in self.splits.items())
        # A val split repeats images of another split: count each missing file once.
        lost = len({path for paths in self.missing.values() for path in paths})
        return f"{self.name}: {counts} images; {lost} named by the annotations but missing"


def present_items(candidates: list[BenchmarkItem], missing: list[str]) -> list[BenchmarkItem]:
    """The candidates whose image (and mask) exist; the others' paths go to `missing`."""
    kept = []
    for item in candidates:
        absent = [p for p in (item.image, item.mask) if p is not None and not p.is_file()]
        if absent:
            missing.extend(str(path) for path in absent)
        else:
            kept.append(item)
    return kept


def last_tenth(items: list[T]) -> list[T]:
    """The "val" split: the last VAL_FRACTION of `items`, in the annotations' order."""
    count = round(VAL_FRACTION * len(items))
    return items[len(items) - count :] if count else []


def present_splits(
    candidates: dict[str, list[BenchmarkItem]], val_of: str
) -> tuple[dict[str, list[BenchmarkItem]], dict[str, list[str]]]:
    """Each split's items whose files exist, plus "val", the last tenth of split `val_of`'s
    candidates; and per split the files that are missing."""
    candidates = {**candidates, "val": last_tenth(candidates[val_of])}
    missing: dict[str, list[str]] = {split: [] for split in candidates}
    splits = {split: present_items(items, missing[split]) for split, items in candidates.items()}
    return splits, missing


def key_of(name: str) -> str:
    """A sample key from a file name relative to the image folder: the path without its
    extension, any other "." made "_" (WebDataset splits keys at the first dot)."""
    return Path(name).with_suffix("").as_posix().replace(".", "_")


def frame_item(item: BenchmarkItem, size: int) -> Sample:
    """The item's region of its image as a size x size square, landmarks in its pixels."""
    with Image.open(item.image) as opened:
        picture = opened.convert("RGB")
    if item.mask is not None:
        with Image.open(item.mask) as opened:
            mask = np.asarray(opened.convert("L"), np.float32) / 255.0
        if mask.shape != (picture.height, picture.width):
            raise ValueError(
                f"{item.mask}: a {mask.shape[1]}x{mask.shape[0]} mask for the "
                f"{picture.width}x{picture.height} image {item.image}; expected the same size"
            )
        masked = np.asarray(picture, np.float32) * mask[..., None]
        picture = Image.fromarray(np.round(masked).astype(np.uint8))
    width, height = picture.size
    left, top, right, bottom = item.region.in_pixels(width, height)
    # A region reaching outside the image (CUB's squared bounding boxes): pad with black.
    pad_left, pad_top = max(0, math.ceil(-left)), max(0, math.ceil(-top))
    pad_right, pad_bottom = max(0, math.ceil(right - width)), max(0, math.ceil(bottom - height))
    if pad_left or pad_top or pad_right or pad_bottom:
        canvas = Image.new("RGB", (width + pad_left + pad_right, height + pad_top + pad_bottom))
        canvas.paste(picture, (pad_left, pad_top))
        picture = canvas
    box = (left + pad_left, top + pad_top, right + pad_left, bottom + pad_top)
    resized = picture.resize((size, size), Image.Resampling.BILINEAR, box=box)
    points = np.asarray(item.landmarks, np.float64) + item.origin_offset
    if item.annotated_size is not None:
        points = points * [width / item.annotated_size[0], height / item.annotated_size[1]]
    # The shard convention: the region's [left, right] maps onto [0, size] continuously.
    scale = [size / (right - left), size / (bottom - top)]
    landmarks = ((points - [left, top]) * scale).astype(np.float32)
    return Sample(item.key, np.asarray(resized), landmarks, item.metadata, item.visible)


def frame_items(items: list[BenchmarkItem], size: int) -> list[Sample]:
    return [frame_item(item, size) for item in items]


def write_benchmark(
    imported: BenchmarkImport,
    dest: str,
    *,
    image_size: int,
    shard_samples: int,
    seed: int = 0,
    write: WriteOptions | None = None,
) -> dict[str, Manifest]:
    """Writes every split of `imported` to DEST/{split}/ (shards and manifest). Each split is
    shuffled (seeded) first, so that every shard mixes subjects, sequences and classes."""
    write = write or WriteOptions()
    manifests = {}
    for split, items in imported.splits.items():
        if not items:
            raise ValueError(
                f"{imported.name}: the {split} split has no image to write "
                f"({len(imported.missing.get(split, []))} missing); check SRC"
            )
        order = np.random.default_rng(seed).permutation(len(items))
        members = [items[i] for i in order]
        jobs: list[ShardJob] = [
            functools.partial(frame_items, members[start : start + shard_samples], image_size)
            for start in range(0, len(members), shard_samples)
        ]
        missing = len(imported.missing.get(split, []))
        summary = DatasetSummary(
            split=split,
            image_size=image_size,
            image_format=write.encoding.image_format,
            num_landmarks=imported.layout.num_landmarks,
            source=f"{imported.source}; {missing} images named by the annotations of this "
            "split were missing and skipped",
            landmark_names=imported.landmark_names,
            layout=imported.layout,
            metadata_fields=imported.metadata_fields,
        )
        manifests[split] = write_split(jobs, len(members), dest, summary, write)
    return manifests
