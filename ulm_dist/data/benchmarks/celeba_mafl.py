"""CelebA with MAFL's 5-point split, as Jakab et al. 2018 (IMM) and Zhang et al. 2018 use it.

SRC is the CelebA folder as its publisher (MMLAB, CUHK) distributes it, with MAFL's two
lists beside it (IMM's `celeba.zip` has exactly this layout):

    SRC/Img/img_align_celeba/000001.jpg ...     the aligned 178x218 crops (or
                                                img_align_celeba_png/*.png, or IMM's
                                                img_align_celeba_hq/*.jpg)
    SRC/Anno/list_landmarks_align_celeba.txt    line 1 the image count, line 2 the column
                                                names, then "000001.jpg lefteye_x lefteye_y
                                                righteye_x righteye_y nose_x nose_y
                                                leftmouth_x leftmouth_y rightmouth_x
                                                rightmouth_y" in pixels of the aligned image
    SRC/Eval/list_eval_partition.txt            "000001.jpg 0": 0 train, 1 val, 2 test
    SRC/MAFL/training.txt, SRC/MAFL/testing.txt the MAFL image names, one a line (19,000 and
                                                1,000)

(checked against tomasjakab/imm `imm/datasets/celeba_dataset.py` and YutingZhang/lmdis-rep
`nets/data/celeba_mafl_100x100_80x80.py`). The splits written:

- `train`: CelebA's training partition without the MAFL test images (Zhang et al.'s list),
  for unsupervised training;
- `mafl_train`: MAFL's 19,000 training images, which the regressor is fit on;
- `test`: MAFL's 1,000 test images, which the error is reported on;
- `val`: the last tenth of MAFL's training list (IMM's validation images), for choosing
  checkpoints during training without looking at `test`.

Every image is framed as both papers frame it: the whole aligned image resized to a square of
side R = round(S / 0.8) (IMM: 160 for S = 128; Zhang et al.: 100 for S = 80), then its
centre S x S cut out. The landmarks follow the image exactly, x by R / width and y by
R / height. This departs from IMM's `celeba_dataset.py`, whose `_resize_points` multiplies
the (x, y) points by (R / height, R / width), i.e. x by R / 218 and y by R / 178: its
stored points are off by that factor (a fitted linear map absorbs much of it, not all).

The regressor is fit on all of `mafl_train`, as Jakab et al. 2018 and Zhang et al. 2018
describe it (19,000 faces). IMM's code fits on MAFL's training list less its last tenth
(its validation faces, the `val` split here): its published errors come from 17,100 faces.

The 5 points keep CelebA's order, which is MAFL's: image-left eye, image-right eye, nose,
image-left and image-right mouth corner.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ulm_dist.data.benchmarks.annotation_files import (
    AnnotationError,
    read_annotation_lines,
    require_file,
)
from ulm_dist.data.benchmarks.importer import (
    BenchmarkImport,
    BenchmarkItem,
    ImportOptions,
    Region,
    present_splits,
)
from ulm_dist.data.layouts import MAFL5, MAFL5_NAMES

NAME = "celeba-mafl"
LAYOUT = dataclasses.replace(MAFL5, protocol="mafl")
# The landmarks are integer pixel positions of the aligned image, taken as 0-based indices
# (pixel i's centre is i + 0.5 in the shards). Not verified: CelebA's README and the file's
# header state no origin, and IMM's celeba_dataset.py and lmdis-rep use the integers as they
# are, without a shift.
PIXEL_ORIGIN = 0.5
# The centre share of the square-resized image that is kept (IMM's crop_percent).
CROP_FRACTION = 0.8
# Where the aligned images may be, in the order tried: CelebA's JPEGs, its PNGs (Zhang et
# al.), IMM's re-encoded copies.
IMAGE_FOLDERS = ("img_align_celeba", "img_align_celeba_png", "img_align_celeba_hq")
_LANDMARK_COLUMNS = 11  # the image name and 5 (x, y) pairs


def centre_crop_region(image_size: int, crop_fraction: float = CROP_FRACTION) -> Region:
    """The region of the aligned image that IMM's and Zhang et al.'s framing keeps: resized to
    a square of side R = round(S / crop_fraction), the centre S x S at margin
    m = round((R - S) / 2), i.e. [m / R, (m + S) / R] of each side."""
    resized = round(image_size / crop_fraction)
    margin = round((resized - image_size) / 2)
    low, high = margin / resized, (margin + image_size) / resized
    return Region(low, low, high, high, relative=True)


def image_folder(source: Path) -> Path:
    for name in IMAGE_FOLDERS:
        if (source / "Img" / name).is_dir():
            return source / "Img" / name
    raise FileNotFoundError(
        f"{source / 'Img'}: expected the aligned CelebA images in one of {list(IMAGE_FOLDERS)}"
    )


def read_landmarks(path: Path) -> dict[str, np.ndarray]:
    """list_landmarks_align_celeba.txt: image name -> (5, 2) (x, y)."""
    require_file(path, "CelebA's aligned landmarks (Anno/list_landmarks_align_celeba.txt)")
    first = path.read_text().split("\n", 1)[0].strip()
    if not first.isdigit():
        raise AnnotationError(
            f"{path}, line 1: expected the image count, found {first!r}; the file is not as "
            "its publisher distributes it"
        )
    rows = read_annotation_lines(
        path,
        "CelebA's aligned landmarks",
        columns=_LANDMARK_COLUMNS,
        expected="an image name and 10 landmark coordinates (x, y of 5 points)",
        skip_lines=2,
    )
    expected = "an image name and 10 numeric landmark coordinates"
    return {
        row.fields[0]: np.reshape(row.numbers(1, _LANDMARK_COLUMNS, expected), (5, 2))
        for row in rows
    }


def read_names(path: Path, what: str) -> list[str]:
    """A MAFL list: the first field of each line is an image name."""
    rows = read_annotation_lines(path, what, columns=None, expected="an image name")
    return [row.fields[0] for row in rows]


def read_partition(path: Path) -> dict[str, int]:
    rows = read_annotation_lines(
        path,
        "CelebA's partition (Eval/list_eval_partition.txt)",
        columns=2,
        expected="an image name and its partition (0 train, 1 val, 2 test)",
    )
    partition = {}
    for row in rows:
        value = row.integer(1, "an image name and its partition (0 train, 1 val, 2 test)")
        if value not in (0, 1, 2):
            raise row.error("an image name and its partition (0 train, 1 val, 2 test)")
        partition[row.fields[0]] = value
    return partition


def collect(source: Path, image_size: int, options: ImportOptions) -> BenchmarkImport:
    crop_fraction = options.crop_fraction
    landmarks = read_landmarks(source / "Anno" / "list_landmarks_align_celeba.txt")
    partition = read_partition(source / "Eval" / "list_eval_partition.txt")
    mafl_train = read_names(source / "MAFL" / "training.txt", "MAFL's training list")
    mafl_test = read_names(source / "MAFL" / "testing.txt", "MAFL's test list")
    folder = image_folder(source)
    region = centre_crop_region(image_size, crop_fraction)
    held_out = set(mafl_test)
    celeba_train = [name for name, part in partition.items() if part == 0 and name not in held_out]
    unannotated = sorted(set(celeba_train + mafl_train + mafl_test) - set(landmarks))
    if unannotated:
        raise AnnotationError(
            f"{source / 'Anno' / 'list_landmarks_align_celeba.txt'}: no landmarks for "
            f"{len(unannotated)} images of the splits, e.g. {unannotated[:3]}"
        )

    def items(names: list[str]) -> list[BenchmarkItem]:
        return [
            BenchmarkItem(
                key=Path(name).stem,
                image=_image_path(folder, name),
                landmarks=landmarks[name],
                region=region,
                origin_offset=PIXEL_ORIGIN,
            )
            for name in names
        ]

    splits, missing = present_splits(
        {"train": items(celeba_train), "mafl_train": items(mafl_train), "test": items(mafl_test)},
        val_of="mafl_train",
    )
    return BenchmarkImport(
        name=NAME,
        splits=splits,
        missing=missing,
        layout=LAYOUT,
        landmark_names=MAFL5_NAMES,
        source=f"CelebA + MAFL ({source.resolve()}), aligned images framed as IMM "
        f"(centre {crop_fraction:g} of the square-resized image)",
    )


def _image_path(folder: Path, name: str) -> Path:
    # Zhang et al.'s PNG copies keep the names of the lists, with .png for .jpg.
    if folder.name.endswith("_png"):
        return folder / (Path(name).stem + ".png")
    return folder / name
