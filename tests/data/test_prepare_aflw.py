"""`prepare aflw` on fabricated faces in the layout of the MAFL-style AFLW release."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from shard_contents import LOSSLESS, bright_centre, mark_pixel, prepare_benchmark, read_split

from ulm_dist.data.benchmarks import collect_benchmark
from ulm_dist.data.benchmarks.annotation_files import AnnotationError
from ulm_dist.data.benchmarks.importer import write_benchmark

TRAIN = [f"image{i:05d}.jpg" for i in range(9)]
TEST = [f"image{i:05d}.jpg" for i in range(100, 103)]
MISSING = TRAIN[3]


def gt_rows(count: int, offset: int) -> np.ndarray:
    """(count, 5, 2) points as the release stores them: (row, column) = (y, x)."""
    base = np.array([[4, 10], [4, 22], [8, 16], [12, 11], [12, 21]], np.float64)
    return np.stack([base + np.array([0, offset + i]) for i in range(count)])


def write_aflw(root: Path) -> Path:
    (root / "output").mkdir(parents=True)
    for name in TRAIN + TEST:
        if name != MISSING:
            Image.new("RGB", (32, 16), (120, 80, 40)).save(root / "output" / name)
    for split, names, offset in (("train", TRAIN, 0), ("test", TEST, 5)):
        (root / f"aflw_{split}_images.txt").write_text("".join(n + "\n" for n in names))
        hw = np.tile([16.0, 32.0], (len(names), 1))  # (height, width) of each 32 x 16 crop
        scipy.io.savemat(
            root / f"aflw_{split}_keypoints.mat", {"gt": gt_rows(len(names), offset), "hw": hw}
        )
    return root


def test_splits_and_points_follow_the_release(tmp_path):
    source = write_aflw(tmp_path / "aflw")
    imported = prepare_benchmark("aflw", source, tmp_path / "shards", 16)
    _, train = read_split(tmp_path / "shards", "train")
    manifest, test = read_split(tmp_path / "shards", "test")
    _, val = read_split(tmp_path / "shards", "val")
    assert set(train) == {Path(n).stem for n in TRAIN if n != MISSING}
    assert set(test) == {"image00100", "image00101", "image00102"} and manifest.samples == 3
    assert set(val) == {"image00008"}  # the last tenth (1 of 9) of the training list
    assert len(imported.missing["train"]) == 1 and imported.missing["train"][0].endswith(MISSING)
    assert manifest.summary.layout.protocol == "aflw"
    # The whole 32 x 16 crop becomes 16 x 16, gt's 0-based pixels at their centres:
    # x' = (x + 0.5) / 2, y' = y + 0.5. Test face 101 has offset 5 + 1: its left eye (row 4,
    # column 16) is at (8.25, 4.5).
    assert test["image00101"].landmarks == pytest.approx(
        np.array([[8.25, 4.5], [14.25, 4.5], [11.25, 8.5], [8.75, 12.5], [13.75, 12.5]])
    )


def test_the_landmark_lands_on_the_marked_pixel(tmp_path):
    # Test face 101's left eye is gt (row 4, column 16); only that pixel is lit. The 32 x 16
    # crop becomes 64 x 64 (x2, x4): the pixel's centre (16.5, 4.5) lands at (33, 18).
    source = write_aflw(tmp_path / "aflw")
    mark_pixel(source / "output" / "image00101.jpg", (32, 16), 16, 4)
    imported = collect_benchmark("aflw", source, image_size=64)
    imported.splits = {"test": imported.splits["test"]}
    write_benchmark(
        imported, str(tmp_path / "shards"), image_size=64, shard_samples=4, write=LOSSLESS
    )
    face = read_split(tmp_path / "shards", "test")[1]["image00101"]
    assert face.landmarks[0] == pytest.approx([33.0, 18.0])
    assert bright_centre(face.image) == pytest.approx(face.landmarks[0], abs=0.1)


def test_a_keypoint_file_that_does_not_match_the_list_is_named(tmp_path):
    source = write_aflw(tmp_path / "aflw")
    scipy.io.savemat(
        source / "aflw_test_keypoints.mat", {"gt": gt_rows(2, 0), "hw": np.ones((2, 2))}
    )
    with pytest.raises(AnnotationError, match=r"aflw_test_keypoints.mat: expected gt of shape"):
        collect_benchmark("aflw", source, image_size=16)


def test_a_blank_line_inside_the_image_list_names_the_file_and_the_line(tmp_path):
    source = write_aflw(tmp_path / "aflw")
    (source / "aflw_test_images.txt").write_text(f"{TEST[0]}\n\n{TEST[1]}\n{TEST[2]}\n")
    with pytest.raises(AnnotationError, match=r"aflw_test_images.txt, line 2: expected one"):
        collect_benchmark("aflw", source, image_size=16)
