"""`prepare celeba-mafl` on a dozen fabricated aligned faces in CelebA's and MAFL's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shard_contents import LOSSLESS, bright_centre, mark_pixel, prepare_benchmark, read_split

from ulm_dist.config import load_config
from ulm_dist.data.__main__ import main
from ulm_dist.data.benchmarks import collect_benchmark
from ulm_dist.data.benchmarks.annotation_files import AnnotationError
from ulm_dist.data.benchmarks.importer import write_benchmark
from ulm_dist.deploy.trained import TrainedModel
from ulm_dist.evaluate import command
from ulm_dist.models import build_learner

NAMES = [f"{i:06d}.jpg" for i in range(1, 13)]
PARTITION = {**{n: 0 for n in NAMES[:8]}, NAMES[8]: 1, NAMES[9]: 1, NAMES[10]: 2, NAMES[11]: 2}
MAFL_TRAIN = NAMES[2:10]  # 000003 .. 000010
MAFL_TEST = [NAMES[0], NAMES[1], NAMES[10]]  # 000001, 000002, 000011
MISSING = NAMES[4]  # 000005: in CelebA's training partition and in MAFL's training list


def eye_nose_mouth(index: int) -> list[int]:
    """Image index's 5 points in a 40 x 50 aligned image, shifted right by `index` pixels."""
    points = [(12, 15), (28, 15), (20, 25), (14, 35), (26, 35)]
    return [value for x, y in points for value in (x + index, y)]


def write_celeba(root: Path) -> Path:
    (root / "Img" / "img_align_celeba").mkdir(parents=True)
    (root / "Anno").mkdir()
    (root / "Eval").mkdir()
    (root / "MAFL").mkdir()
    for index, name in enumerate(NAMES, start=1):
        if name != MISSING:
            Image.new("RGB", (40, 50), (10 * index, 100, 50)).save(
                root / "Img" / "img_align_celeba" / name
            )
    header = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
    header += "rightmouth_x rightmouth_y"
    rows = [
        f"{name} " + " ".join(f"{v:4d}" for v in eye_nose_mouth(i))
        for i, name in enumerate(NAMES, start=1)
    ]
    (root / "Anno" / "list_landmarks_align_celeba.txt").write_text(
        "\n".join([str(len(NAMES)), header, *rows]) + "\n"
    )
    (root / "Eval" / "list_eval_partition.txt").write_text(
        "".join(f"{name} {part}\n" for name, part in PARTITION.items())
    )
    (root / "MAFL" / "training.txt").write_text("".join(n + "\n" for n in MAFL_TRAIN))
    (root / "MAFL" / "testing.txt").write_text("".join(n + "\n" for n in MAFL_TEST))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("celeba")
    source = write_celeba(root / "celeba")
    imported = prepare_benchmark("celeba-mafl", source, root / "shards", 16)
    return root / "shards", imported


def test_splits_follow_celeba_and_mafl_and_skip_the_missing_image(prepared):
    dest, imported = prepared
    expected = {
        # CelebA's training partition (1-8) without MAFL's test faces (1, 2) or the missing 5.
        "train": {"000003", "000004", "000006", "000007", "000008"},
        "mafl_train": {"000003", "000004", "000006", "000007", "000008", "000009", "000010"},
        "test": {"000001", "000002", "000011"},
        "val": {"000010"},  # the last tenth (1 of 8) of MAFL's training list
    }
    shard_counts = {"train": 2, "mafl_train": 2, "test": 1, "val": 1}  # 4 samples a shard
    for split, keys in expected.items():
        manifest, samples = read_split(dest, split)
        assert set(samples) == keys
        assert manifest.samples == len(keys) and len(manifest.shards) == shard_counts[split]
        assert manifest.summary.layout.protocol == "mafl"
    assert imported.missing["train"] == imported.missing["mafl_train"] != []
    assert imported.missing["train"][0].endswith("000005.jpg") and not imported.missing["test"]


def test_points_follow_imm_framing_of_the_aligned_image(prepared):
    # 40 x 50 resized to 20 x 20 (16 / 0.8), centre 16 x 16 kept; the integer positions are
    # 0-based pixels, whose centres are at + 0.5: x' = (x + 0.5 - 4) / 2,
    # y' = (y + 0.5 - 5) * 16 / 40.
    _, samples = read_split(prepared[0], "test")
    assert samples["000011"].landmarks == pytest.approx(
        np.array([[9.75, 4.2], [17.75, 4.2], [13.75, 8.2], [10.75, 12.2], [16.75, 12.2]])
    )
    assert samples["000001"].landmarks[2] == pytest.approx([8.75, 8.2])  # nose (21, 25)
    assert samples["000001"].image.shape == (16, 16, 3)


def test_the_landmark_lands_on_the_marked_pixel(tmp_path):
    # 000011's nose is annotated at pixel (31, 25); only that pixel is lit. Size 64: resized
    # to 80 (64 / 0.8), margin 8, i.e. columns 4..36 and rows 5..45 kept, x2 and x1.6:
    # its centre (31.5, 25.5) lands at (55, 32.8).
    source = write_celeba(tmp_path / "celeba")
    mark_pixel(source / "Img" / "img_align_celeba" / "000011.jpg", (40, 50), 31, 25)
    imported = collect_benchmark("celeba-mafl", source, image_size=64)
    imported.splits = {"test": imported.splits["test"]}
    write_benchmark(
        imported, str(tmp_path / "shards"), image_size=64, shard_samples=4, write=LOSSLESS
    )
    nose = read_split(tmp_path / "shards", "test")[1]["000011"]
    assert nose.landmarks[2] == pytest.approx([55.0, 32.8])
    assert bright_centre(nose.image) == pytest.approx(nose.landmarks[2], abs=0.1)


def test_a_malformed_landmark_line_names_the_file_and_the_line(tmp_path):
    source = write_celeba(tmp_path / "celeba")
    table = source / "Anno" / "list_landmarks_align_celeba.txt"
    lines = table.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0]  # 000003 loses its last coordinate
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"list_landmarks_align_celeba.txt, line 5: "):
        collect_benchmark("celeba-mafl", source, image_size=16)


def test_the_command_reports_the_skipped_image(tmp_path, capsys):
    source = write_celeba(tmp_path / "celeba")
    argv = ["prepare", "celeba-mafl", str(source), str(tmp_path / "out"), "--size", "16"]
    assert main([*argv, "--workers", "1", "--no-progress", "--samples-per-shard", "4"]) == 0
    out = capsys.readouterr().out
    assert "train: skipped 1 missing images" in out and "000005.jpg" in out
    assert (tmp_path / "out" / "mafl_train" / "manifest.parquet").is_file()


def test_the_command_follows_the_mafl_protocol_of_prepared_shards(tmp_path, monkeypatch):
    # An untrained tiny learner stands in for a checkpoint: the protocol, not the model, is
    # under test.
    source = write_celeba(tmp_path / "celeba")
    argv = ["prepare", "celeba-mafl", str(source), str(tmp_path / "shards"), "--size", "32"]
    assert main([*argv, "--workers", "1", "--no-progress"]) == 0
    config = load_config(overrides=["data.num_workers=0"])
    torch.manual_seed(0)
    learner = build_learner(config.model, config.loss).eval()
    monkeypatch.setattr(
        command, "load_trained", lambda uri, s3: TrainedModel(config, learner, 7, uri)
    )
    resolved = []

    def prepare_shards(data, spec, split, **kwargs):
        resolved.append(split)
        return real_prepare_shards(data, spec, split, **kwargs)

    real_prepare_shards = command.prepare_shards
    monkeypatch.setattr(command, "prepare_shards", prepare_shards)
    out = tmp_path / "out"
    assert command.main(["ckpt", "--data", str(tmp_path / "shards"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["protocol"], summary["fit_split"], summary["normaliser"]) == (
        "mafl",
        "mafl_train",
        "inter-ocular",
    )
    # The test split's manifest names the protocol and its fit split: each read once.
    assert resolved == ["test", "mafl_train"]
    assert (summary["fit_images"], summary["test_images"]) == (7, 3)  # MAFL train less 000005
