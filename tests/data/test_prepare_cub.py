"""`prepare cub` on a dozen fabricated birds in the CUB_200_2011 layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_contents import LOSSLESS, bright_centre, mark_pixel, prepare_benchmark, read_split

from ulm_dist.config import DataConfig, load_config
from ulm_dist.data import resolve_shards
from ulm_dist.data.benchmarks import collect_benchmark
from ulm_dist.data.benchmarks.annotation_files import AnnotationError
from ulm_dist.data.benchmarks.importer import write_benchmark
from ulm_dist.deploy.trained import TrainedModel
from ulm_dist.evaluate import command
from ulm_dist.evaluate.periodic import load_validation_set
from ulm_dist.models import build_learner

PARTS = (
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
    "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat",
)  # fmt: skip
MISSING_ID = 4
# Image 1's box reaches outside the image on the left; image 2 has its beak (part 2) hidden.
BOXES = {1: (0.0, 0.0, 10.0, 20.0), **{i: (10.0, 5.0, 20.0, 10.0) for i in range(2, 13)}}


def image_name(image_id: int) -> str:
    folder = "001.Black_footed_Albatross" if image_id <= 6 else "002.Laysan_Albatross"
    return f"{folder}/{folder[4:]}_{image_id:04d}_{796000 + image_id}.jpg"


def part_rows(image_id: int) -> list[str]:
    rows = []
    for part in range(1, len(PARTS) + 1):
        x, y, visible = 15.0 + part * 0.5, 8.0, 1
        if image_id == 1:
            x, y = 5.0, 10.0
        if image_id == 2 and part == 2:
            x, y, visible = 0.0, 0.0, 0
        rows.append(f"{image_id} {part} {x:.1f} {y:.1f} {visible}")
    return rows


def write_cub(root: Path) -> Path:
    for image_id in range(1, 13):
        path = root / "images" / image_name(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        if image_id != MISSING_ID:
            Image.new("RGB", (40, 30), (200, 150, 100)).save(path)
    ids = range(1, 13)
    (root / "images.txt").write_text("".join(f"{i} {image_name(i)}\n" for i in ids))
    (root / "train_test_split.txt").write_text("".join(f"{i} {int(i <= 8)}\n" for i in ids))
    (root / "bounding_boxes.txt").write_text(
        "".join(f"{i} " + " ".join(f"{v:.1f}" for v in BOXES[i]) + "\n" for i in ids)
    )
    (root / "parts").mkdir()
    (root / "parts" / "parts.txt").write_text(
        "".join(f"{k} {name}\n" for k, name in enumerate(PARTS, start=1))
    )
    (root / "parts" / "part_locs.txt").write_text(
        "".join(row + "\n" for i in ids for row in part_rows(i))
    )
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("cub")
    imported = prepare_benchmark("cub", write_cub(root / "CUB_200_2011"), root / "shards", 16)
    return root / "shards", imported


def test_official_split_with_the_missing_image_skipped(prepared):
    dest, imported = prepared
    manifest, train = read_split(dest, "train")
    _, test = read_split(dest, "test")
    _, val = read_split(dest, "val")
    assert sorted(s.metadata["image_id"] for s in train.values()) == [1, 2, 3, 5, 6, 7, 8]
    assert sorted(s.metadata["image_id"] for s in test.values()) == [9, 10, 11, 12]
    assert [s.metadata["image_id"] for s in val.values()] == [8]  # last tenth of 8 train ids
    assert manifest.samples == 7 and len(manifest.shards) == 2
    assert imported.missing["train"][0].endswith(image_name(MISSING_ID))
    assert manifest.summary.layout.protocol == "cub"


def test_the_invisible_part_keeps_its_flag(prepared):
    _, train = read_split(prepared[0], "train")
    by_id = {s.metadata["image_id"]: s for s in train.values()}
    assert by_id[2].visible.tolist() == [True, False] + [True] * 13
    assert by_id[3].visible.all()


def test_points_follow_the_squared_bounding_box(prepared):
    _, train = read_split(prepared[0], "train")
    by_id = {s.metadata["image_id"]: s for s in train.values()}
    # Box (10, 5, 20 x 10) squared: side 20 at (10, 0); 16 / 20 = 0.8 per pixel; the parts
    # are 0-based pixels, centres at + 0.5. Part 1 at (15.5, 8) -> (4.8, 6.8); part 15 at
    # (22.5, 8) -> (10.4, 6.8).
    assert by_id[3].landmarks[0] == pytest.approx([4.8, 6.8])
    assert by_id[3].landmarks[14] == pytest.approx([10.4, 6.8])
    # Box (0, 0, 10 x 20) squared: side 20 at (-5, 0), 5 pixels past the left edge, black.
    assert by_id[1].landmarks[0] == pytest.approx([8.4, 8.4])  # (5, 10)
    image = by_id[1].image
    bird = np.abs(image[:, 8:].astype(int) - [200, 150, 100])
    assert (image[:, :3] == 0).all() and (bird <= 4).all()  # the bird: a JPEG's uniform colour


def test_the_part_lands_on_the_marked_pixel(tmp_path):
    # Bird 9 (a test image) has its beak (part 2) at pixel (16, 8); only that pixel is lit.
    # Its box (10, 5, 20 x 10) squared is (10, 0) to (30, 20), stored at 64 (x3.2): the
    # pixel's centre (16.5, 8.5) lands at (20.8, 27.2).
    source = write_cub(tmp_path / "CUB_200_2011")
    mark_pixel(source / "images" / image_name(9), (40, 30), 16, 8)
    imported = collect_benchmark("cub", source, image_size=64)
    imported.splits = {"test": [i for i in imported.splits["test"] if i.metadata["image_id"] == 9]}
    write_benchmark(
        imported, str(tmp_path / "shards"), image_size=64, shard_samples=4, write=LOSSLESS
    )
    (bird,) = read_split(tmp_path / "shards", "test")[1].values()
    assert bird.landmarks[1] == pytest.approx([20.8, 27.2])
    assert bright_centre(bird.image) == pytest.approx(bird.landmarks[1], abs=0.1)


def test_left_and_right_parts_swap_under_a_flip(prepared):
    layout = prepared[1].layout
    eye, leg, wing = PARTS.index("left eye"), PARTS.index("left leg"), PARTS.index("left wing")
    assert layout.flip_permutation[eye] == PARTS.index("right eye")
    assert layout.flip_permutation[PARTS.index("right wing")] == wing
    assert layout.flip_permutation[leg] == PARTS.index("right leg")
    assert layout.flip_permutation[PARTS.index("beak")] == PARTS.index("beak")


def test_a_malformed_part_line_names_the_file_and_the_line(tmp_path):
    source = write_cub(tmp_path / "CUB_200_2011")
    locations = source / "parts" / "part_locs.txt"
    lines = locations.read_text().splitlines()
    lines[16] = "2 2 0.0 0.0"  # image 2's beak without its visibility flag
    locations.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"part_locs.txt, line 17: expected an image id"):
        collect_benchmark("cub", source, image_size=16)


def test_evaluation_reads_the_flags_and_the_protocol_from_the_shards(prepared):
    data = DataConfig(num_workers=0)
    shards = resolve_shards(data, str(prepared[0]), "train", image_size=16)
    val = load_validation_set(data, shards, 16, samples=7)
    assert (val.normalisation.name, val.normalisation.image_size) == ("image-size", 16)
    assert val.visible.shape == (7, 15) and int(val.visible.sum()) == 7 * 15 - 1


def test_the_command_scores_visible_parts_over_the_image_side(prepared, tmp_path, monkeypatch):
    # An untrained tiny learner stands in for a checkpoint: the protocol is under test.
    config = load_config(overrides=["data.num_workers=0"])
    torch.manual_seed(0)
    learner = build_learner(config.model, config.loss).eval()
    monkeypatch.setattr(
        command, "load_trained", lambda uri, s3: TrainedModel(config, learner, 7, uri)
    )
    out = tmp_path / "out"
    assert command.main(["ckpt", "--data", str(prepared[0]), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["protocol"], summary["fit_split"], summary["normaliser"]) == (
        "cub",
        "train",
        "image-size",
    )
    # Hidden parts cannot be the reverse map's inputs: no reverse error for CUB.
    assert summary["landmark_error_reverse"] != summary["landmark_error_reverse"]
    assert summary["landmark_error"] == summary["landmark_error"]  # finite: visible parts
