"""A user's image folder (jpg/png, nested folders) plus an optional landmarks table, as samples.

The table is CSV or Parquet with one row per image: an image column (`image`, `file`, `path`
or `filename`, else the first column) holding paths relative to the folder, landmark columns
`x0, y0, x1, y1, ...` (any numbering, `x_0` also accepted) in pixels of the original image,
and any other columns (an `identity`, say), which are kept as per-sample metadata. With a
table, its rows are the data set; without one, every image under the folder is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet
from PIL import Image

from ulm_dist.data.shards import Sample

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_IMAGE_COLUMNS = ("image", "file", "path", "filename")
_COORDINATE_COLUMN = re.compile(r"^([xy])_?(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class FolderItem:
    path: str  # absolute path of the image file
    key: str  # its path relative to the folder, without suffix, dots replaced by "_"
    landmarks: np.ndarray | None = None  # (L, 2) pixels of the original image
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LandmarkTable:
    images: list[str]  # paths relative to the image folder
    landmarks: np.ndarray  # (N, L, 2)
    landmark_names: list[str]  # the column numbers: "0", "1", ...
    metadata: dict[str, list[Any]]  # the other columns


def read_landmark_table(path: str | Path) -> LandmarkTable:
    """Parses a CSV or Parquet landmarks table (see the module docstring)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        table = pyarrow.parquet.read_table(path)
    elif path.suffix.lower() == ".csv":
        table = pyarrow.csv.read_csv(path)
    else:
        raise ValueError(f"{path}: expected a .csv or .parquet landmarks table")
    columns = table.column_names
    image_column = next((name for name in columns if name.lower() in _IMAGE_COLUMNS), columns[0])
    coordinates: dict[str, dict[str, str]] = {}
    for name in columns:
        match = _COORDINATE_COLUMN.match(name)
        if match:
            coordinates.setdefault(match.group(2), {})[match.group(1).lower()] = name
    unpaired = sorted(number for number, axes in coordinates.items() if len(axes) != 2)
    if unpaired:
        raise ValueError(
            f"{path}: landmarks {unpaired} have an x or a y column but not both; expected "
            "columns x0, y0, x1, y1, ..."
        )
    numbers = sorted(coordinates, key=int)
    landmarks = np.zeros((table.num_rows, len(numbers), 2), np.float32)
    for index, number in enumerate(numbers):
        for axis, letter in enumerate("xy"):
            column = table.column(coordinates[number][letter]).cast(pa.float32())
            landmarks[:, index, axis] = column.to_numpy(zero_copy_only=False)
    incomplete = np.flatnonzero(np.isnan(landmarks).any(axis=(1, 2)))
    if len(incomplete):
        raise ValueError(
            f"{path}: {len(incomplete)} rows have empty landmark values (rows "
            f"{incomplete[:5].tolist()}); fill them in or drop those rows"
        )
    used = {image_column, *(name for axes in coordinates.values() for name in axes.values())}
    return LandmarkTable(
        images=[str(value) for value in table.column(image_column).to_pylist()],
        landmarks=landmarks,
        landmark_names=numbers,
        metadata={name: table.column(name).to_pylist() for name in columns if name not in used},
    )


def folder_items(root: str | Path, table: LandmarkTable | None) -> list[FolderItem]:
    """The samples of an image folder: the table's rows, or every image found under it."""
    root = Path(root).resolve()
    if table is None:
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"{root}: no {sorted(IMAGE_SUFFIXES)} images found under it")
        return [FolderItem(str(path), _key(path.relative_to(root))) for path in found]
    missing = [name for name in table.images if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root}: {len(missing)} images named in the landmarks table are missing, "
            f"e.g. {missing[:3]}; the table's image paths must be relative to the folder"
        )
    items = [
        FolderItem(
            str(root / name),
            _key(Path(name)),
            table.landmarks[row] if table.landmarks.shape[1] else None,
            {column: values[row] for column, values in table.metadata.items()},
        )
        for row, name in enumerate(table.images)
    ]
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        duplicated = sorted({key for key in keys if keys.count(key) > 1})[:3]
        raise ValueError(f"{root}: the table names some images twice (keys {duplicated})")
    return items


def _key(relative: Path) -> str:
    return relative.with_suffix("").as_posix().replace(".", "_")


def split_items(
    items: list[FolderItem],
    fractions: dict[str, float],
    *,
    group_by: str | None,
    seed: int,
) -> dict[str, list[FolderItem]]:
    """Splits items at random into "train" and the named `fractions` (e.g. {"test": 0.1}).

    With `group_by` (a metadata field such as "identity"), whole groups go to one split, so
    the splits share no group; fractions then count groups, not images.
    """
    held_out = sum(fractions.values())
    if any(not 0 <= f < 1 for f in fractions.values()) or held_out >= 1:
        raise ValueError(
            f"split fractions {fractions}: expected each in [0, 1) and a sum below 1, so that "
            "a train split remains"
        )
    if group_by is not None and items and group_by not in items[0].metadata:
        raise ValueError(
            f"split by {group_by!r}: no such column; the table has {sorted(items[0].metadata)}"
        )
    groups = sorted({str(item.metadata[group_by]) if group_by else item.key for item in items})
    order = np.random.default_rng(seed).permutation(len(groups))
    assigned: dict[str, str] = {}
    start = 0
    for split, fraction in fractions.items():
        count = round(fraction * len(groups))
        assigned.update((groups[i], split) for i in order[start : start + count])
        start += count
    splits: dict[str, list[FolderItem]] = {"train": [], **{name: [] for name in fractions}}
    for item in items:
        group = str(item.metadata[group_by]) if group_by else item.key
        splits[assigned.get(group, "train")].append(item)
    return {name: members for name, members in splits.items() if members}


def load_items(items: list[FolderItem], size: int) -> list[Sample]:
    """Reads the images, centre-cropped to a square and resized to `size`, landmarks following."""
    return [_load_item(item, size) for item in items]


def _load_item(item: FolderItem, size: int) -> Sample:
    with Image.open(item.path) as opened:
        picture = opened.convert("RGB")
    width, height = picture.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    # The box maps [left, left + side] onto [0, size] continuously, the shard convention.
    box = (left, top, left + side, top + side)
    resized = picture.resize((size, size), Image.Resampling.BILINEAR, box=box)
    landmarks = None
    if item.landmarks is not None:
        landmarks = ((item.landmarks - [left, top]) * (size / side)).astype(np.float32)
    return Sample(item.key, np.asarray(resized), landmarks, item.metadata)
