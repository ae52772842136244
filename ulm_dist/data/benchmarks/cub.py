"""CUB-200-2011 (Wah et al. 2011): 11,788 birds with 15 part locations and their visibility.

SRC is the `CUB_200_2011` folder as Caltech distributes it:

    SRC/images.txt              "<image_id> <image_name>", names relative to SRC/images/
    SRC/train_test_split.txt    "<image_id> <is_training_image>" (1: train, 0: test)
    SRC/bounding_boxes.txt      "<image_id> <x> <y> <width> <height>" in pixels
    SRC/parts/parts.txt         "<part_id> <part_name>" (15 parts: back, beak, ..., throat)
    SRC/parts/part_locs.txt     "<image_id> <part_id> <x> <y> <visible>" in pixels; an
                                invisible part has visible 0 (and x = y = 0)
    SRC/images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg ...

The splits are the official ones (5,994 train, 5,794 test): the unsupervised training and the
regressor's fit on `train`, the error on `test` (Zhang et al. 2018; Lorenz et al. 2019), plus
`val`, the last tenth of `train` in id order, for choosing checkpoints. Each bird is framed
by its bounding box made square about its centre (side max(width, height), black where it
reaches outside the image), so the stored image's side is the box's longer side. Every part
keeps its visibility flag (`visible.npy` in the shards): evaluation fits and scores only the
visible parts. The flip permutation pairs the parts named "left X" and "right X".

Lorenz et al. 2019 did not use this framing: their CUB images are their own 300 x 300 crops,
"cropped and aligned so that the viewing direction is to the left", with the 15 points in
[0, 1] of the crop (CompVis/unsupervised-disentangling, `transfer-demo/original_code/
custom_datasets/cub_200_2011/README.md`). Errors on these shards are therefore not directly
comparable with theirs; the squared box is ours, the nearest framing the official files
allow.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from ulm_dist.data.benchmarks.annotation_files import AnnotationError, read_annotation_lines
from ulm_dist.data.benchmarks.importer import (
    BenchmarkImport,
    BenchmarkItem,
    ImportOptions,
    Region,
    key_of,
    present_splits,
)
from ulm_dist.data.layouts import LandmarkLayout

NAME = "cub"
PROTOCOL = "cub"
# part_locs.txt's x, y are taken as 0-based pixel indices (pixel i's centre at i + 0.5 in the
# shards); the box's x, y, width, height as its left and top pixels and its extent, i.e. the
# continuous rectangle [x, x + width] x [y, y + height], unshifted. Not verified: the data
# set's README names the columns but no origin.
PIXEL_ORIGIN = 0.5


def read_parts(source: Path) -> list[str]:
    rows = read_annotation_lines(
        source / "parts" / "parts.txt",
        "CUB's part names (parts/parts.txt)",
        columns=2,
        expected="a part id and its name",
        split_columns=2,
    )
    ids = [row.integer(0, "a part id (1, 2, ...) and its name") for row in rows]
    if ids != list(range(1, len(ids) + 1)):
        raise AnnotationError(
            f"{source / 'parts' / 'parts.txt'}: expected part ids 1..{len(ids)} in order, "
            f"found {ids}"
        )
    return [row.fields[1].strip() for row in rows]


def flip_permutation(names: list[str]) -> tuple[int, ...]:
    """Swaps each "left X" with "right X"; the other parts map to themselves."""
    index = {name: k for k, name in enumerate(names)}
    permutation = list(range(len(names)))
    for k, name in enumerate(names):
        for side, other in (("left ", "right "), ("right ", "left ")):
            if name.startswith(side) and other + name[len(side) :] in index:
                permutation[k] = index[other + name[len(side) :]]
    return tuple(permutation)


def square_box(x: float, y: float, width: float, height: float) -> Region:
    """The bounding box made square about its centre, in pixels."""
    side = max(width, height)
    left, top = x + (width - side) / 2, y + (height - side) / 2
    return Region(left, top, left + side, top + side, relative=False)


def _by_image(path: Path, what: str, columns: int, expected: str) -> dict[int, list[str]]:
    rows = read_annotation_lines(path, what, columns=columns, expected=expected)
    table: dict[int, list[str]] = {}
    for row in rows:
        table[row.integer(0, expected)] = row.fields[1:]
    return table


def collect(source: Path, image_size: int, options: ImportOptions) -> BenchmarkImport:
    del image_size, options  # every bird is framed by its box, whatever the size
    parts = read_parts(source)
    images = _by_image(
        source / "images.txt", "CUB's image list", 2, "an image id and its file name"
    )
    is_train = _by_image(
        source / "train_test_split.txt",
        "CUB's split",
        2,
        "an image id and 1 (train) or 0 (test)",
    )
    boxes_file = source / "bounding_boxes.txt"
    boxes: dict[int, Region] = {}
    for row in read_annotation_lines(
        boxes_file,
        "CUB's bounding boxes",
        columns=5,
        expected="an image id and its box x, y, width, height",
    ):
        x, y, width, height = row.numbers(1, 5, "an image id and a numeric x, y, width, height")
        if width <= 0 or height <= 0:
            raise row.error("an image id and its box x, y, width, height (width, height > 0)")
        boxes[row.integer(0, "an image id")] = square_box(x, y, width, height)
    locations = defaultdict(lambda: np.zeros((len(parts), 2)))
    visibility = defaultdict(lambda: np.zeros(len(parts), bool))
    expected = "an image id, a part id, x, y and visible (0 or 1)"
    for row in read_annotation_lines(
        source / "parts" / "part_locs.txt",
        "CUB's part locations (parts/part_locs.txt)",
        columns=5,
        expected=expected,
    ):
        image_id, part = row.integer(0, expected), row.integer(1, expected)
        x, y, visible = row.numbers(2, 5, expected)
        if not 1 <= part <= len(parts) or visible not in (0, 1):
            raise row.error(expected + f", part id in 1..{len(parts)}")
        locations[image_id][part - 1] = x, y
        visibility[image_id][part - 1] = bool(visible)

    candidates: dict[str, list[BenchmarkItem]] = {"train": [], "test": []}
    for image_id, (name,) in sorted(images.items()):
        flag = is_train.get(image_id)
        if flag not in (["0"], ["1"]) or image_id not in boxes or image_id not in locations:
            raise AnnotationError(
                f"{source}: image id {image_id} ({name}) lacks a split flag (0 or 1) in "
                "train_test_split.txt, a box in bounding_boxes.txt or its parts in "
                "parts/part_locs.txt"
            )
        split = "train" if flag == ["1"] else "test"
        candidates[split].append(
            BenchmarkItem(
                key=key_of(name),
                image=source / "images" / name,
                landmarks=locations[image_id],
                region=boxes[image_id],
                visible=visibility[image_id],
                origin_offset=PIXEL_ORIGIN,
                metadata={"image_id": image_id, "class": Path(name).parent.name},
            )
        )
    splits, missing = present_splits(candidates, val_of="train")
    layout = LandmarkLayout(
        eye_left=(), eye_right=(), flip_permutation=flip_permutation(parts), protocol=PROTOCOL
    )
    return BenchmarkImport(
        name=NAME,
        splits=splits,
        missing=missing,
        layout=layout,
        landmark_names=tuple(parts),
        source=f"CUB-200-2011 ({source.resolve()}), birds framed by their squared boxes",
        metadata_fields=("image_id", "class"),
    )
