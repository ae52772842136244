"""AFLW in the MAFL-style 5-point version of Thewlis et al. 2017, as Jakab et al. 2018 (IMM)
and Zhang et al. 2018 use it: 10,122 training and 2,995 test faces.

SRC is that release as distributed (IMM's `aflw_release-2.zip`; Zhang et al.'s
`aflw_data.tar.gz` with `aflw_images.tar.gz` unpacked beside it):

    SRC/aflw_train_images.txt, SRC/aflw_test_images.txt
        one image name a line, relative to the image folder
    SRC/aflw_train_keypoints.mat, SRC/aflw_test_keypoints.mat
        `gt`: (N, 5, 2) points as (row, column), i.e. (y, x), in pixels of the image;
        `hw`: (N, 2) each image's (height, width)
    SRC/output/...   the face crops (or SRC/aflw_images/, Zhang et al.'s name for the folder)

(checked against tomasjakab/imm `imm/datasets/aflw_dataset.py`, which swaps `gt` to (x, y),
and YutingZhang/lmdis-rep `evaluation/face_evaluation.m`, which divides column 1 of `gt` by
`hw`'s height and column 2 by its width). Line k of a list and row k of its `gt` are the same
face. Both papers resize the whole crop to the model's square, without cropping, so the
importer does too. The splits: `train` (every training face: the unsupervised fine-tuning
set and the regressor's), `test`, and `val`, the last tenth of the training list (IMM's
validation faces), for choosing checkpoints. The regressor is fit on all of `train`; IMM's
code (`aflw_dataset.py`) fits it on the training list less that last tenth.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ulm_dist.data.benchmarks.annotation_files import (
    AnnotationError,
    load_mat,
    read_annotation_lines,
)
from ulm_dist.data.benchmarks.importer import (
    WHOLE_IMAGE,
    BenchmarkImport,
    BenchmarkItem,
    ImportOptions,
    key_of,
    present_splits,
)
from ulm_dist.data.layouts import MAFL5, MAFL5_NAMES

NAME = "aflw"
LAYOUT = dataclasses.replace(MAFL5, protocol="aflw")
# `gt` holds pixel indices on "scale (0, h-1)", as lmdis-rep's evaluation/face_evaluation.m
# comments it: 0-based, so pixel i's centre is i + 0.5 in the shards. (A MATLAB file would
# suggest 1-based; the only statement found says 0-based. IMM's aflw_dataset.py applies no
# shift.) Not verified against the release's own generating code, which was not found.
PIXEL_ORIGIN = 0.5
IMAGE_FOLDERS = ("output", "aflw_images")


def read_split(source: Path, folder: Path, split: str) -> list[BenchmarkItem]:
    names_file = source / f"aflw_{split}_images.txt"
    names = [
        row.fields[0]
        for row in read_annotation_lines(
            names_file, f"AFLW's {split} image list", columns=1, expected="one image name"
        )
    ]
    mat_file = source / f"aflw_{split}_keypoints.mat"
    mat = load_mat(mat_file, f"AFLW's {split} keypoints (gt, hw)")
    gt, hw = mat.get("gt"), mat.get("hw")
    if gt is None or hw is None:
        found = sorted(name for name in mat if not name.startswith("__"))
        raise AnnotationError(f"{mat_file}: expected the variables gt and hw, found {found}")
    gt, hw = np.asarray(gt, np.float64), np.asarray(hw, np.float64)
    if gt.shape != (len(names), 5, 2) or hw.shape != (len(names), 2):
        raise AnnotationError(
            f"{mat_file}: expected gt of shape ({len(names)}, 5, 2) and hw of shape "
            f"({len(names)}, 2), one row per line of {names_file.name}; found gt {gt.shape}, "
            f"hw {hw.shape}"
        )
    return [
        BenchmarkItem(
            key=key_of(name),
            image=folder / name,
            landmarks=points[:, ::-1],  # (y, x) -> (x, y)
            region=WHOLE_IMAGE,
            annotated_size=(float(size[1]), float(size[0])),  # hw -> (width, height)
            origin_offset=PIXEL_ORIGIN,
        )
        for name, points, size in zip(names, gt, hw, strict=True)
    ]


def collect(source: Path, image_size: int, options: ImportOptions) -> BenchmarkImport:
    del image_size, options  # the whole crop is resized, whatever the size
    folder = next((source / n for n in IMAGE_FOLDERS if (source / n).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(
            f"{source}: expected the AFLW face crops in one of {list(IMAGE_FOLDERS)}"
        )
    splits, missing = present_splits(
        {split: read_split(source, folder, split) for split in ("train", "test")}, val_of="train"
    )
    return BenchmarkImport(
        name=NAME,
        splits=splits,
        missing=missing,
        layout=LAYOUT,
        landmark_names=MAFL5_NAMES,
        source=f"AFLW, MAFL-style 5 points ({source.resolve()}), whole crops resized",
    )
