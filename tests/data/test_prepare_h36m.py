"""`prepare h36m` on fabricated frames in the layout of the simplified Human3.6M release."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from shard_contents import prepare_benchmark, read_split

from ulm_dist.config import DataConfig, load_config
from ulm_dist.data import resolve_shards
from ulm_dist.data.benchmarks import ImportOptions, collect_benchmark
from ulm_dist.data.benchmarks.annotation_files import AnnotationError
from ulm_dist.data.benchmarks.h36m import EVALUATED_JOINTS
from ulm_dist.deploy.trained import TrainedModel
from ulm_dist.evaluate import command
from ulm_dist.evaluate.periodic import load_validation_set
from ulm_dist.models import build_learner

# Subject -> sequence folders -> frames. WalkDog is not one of the six activities; S5-S8
# have their folders but no sequence, to keep the copy small.
SEQUENCES = {
    "S1": {"Directions 1.54138969": [1, 2, 3], "WalkDog 1.54138969": [1, 2]},
    **{f"S{n}": {} for n in (5, 6, 7, 8)},
    "S9": {"Posing.55011271": [1, 2, 3]},
    "S11": {"Waiting 1.54138969": [1, 2], "Walking.60457274": [1]},
}
MISSING = ("S9", "Posing.55011271", 2)  # its frame is absent, its mask and joints are there


def joints(frame: int) -> np.ndarray:
    """(32, 2) (x, y) in [0, 1]: joint j at (j / 64 + frame / 32, 0.5)."""
    return np.stack([np.arange(32) / 64 + frame / 32, np.full(32, 0.5)], axis=1)


def write_h36m(root: Path) -> Path:
    for subject, sequences in SEQUENCES.items():
        (root / subject / "BackgroudMask").mkdir(parents=True)
        for sequence, frames in sequences.items():
            for kind in ("WithBackground", "BackgroudMask", "Landmarks"):
                (root / subject / kind / sequence).mkdir(parents=True, exist_ok=True)
            for frame in frames:
                folder = root / subject
                if (subject, sequence, frame) != MISSING:
                    picture = Image.new("RGB", (32, 32), (180, 180, 180))
                    picture.save(folder / "WithBackground" / sequence / f"{frame}.jpg")
                mask = np.zeros((32, 32), np.uint8)
                mask[:, 16:] = 255  # the subject on the right half
                Image.fromarray(mask).save(folder / "BackgroudMask" / sequence / f"{frame}.png")
                scipy.io.savemat(
                    folder / "Landmarks" / sequence / f"{frame}.mat",
                    {"keypoints_2d": joints(frame)},
                )
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("h36m")
    imported = prepare_benchmark("h36m", write_h36m(root / "h36m"), root / "shards", 16)
    return root / "shards", imported


def test_subjects_and_activities_make_the_splits(prepared):
    dest, imported = prepared
    manifest, train = read_split(dest, "train")
    _, test = read_split(dest, "test")
    _, val = read_split(dest, "val")
    as_frames = lambda samples: sorted(  # noqa: E731
        (s.metadata["subject"], s.metadata["activity"], s.metadata["frame"])
        for s in samples.values()
    )
    # S1's WalkDog is not an activity of the protocol; S9's frame 2 is missing.
    assert as_frames(train) == [
        ("S1", "directions", 1),
        ("S1", "directions", 2),
        ("S1", "directions", 3),
        ("S9", "posing", 1),
        ("S9", "posing", 3),
    ]
    assert as_frames(test) == [("S11", "waiting", 1), ("S11", "waiting", 2), ("S11", "walking", 1)]
    assert as_frames(val) == [("S9", "posing", 3)]  # the last tenth of the 6 training frames
    assert manifest.samples == 5 and len(manifest.shards) == 2
    assert len(imported.missing["train"]) == 1
    assert imported.missing["train"][0].endswith("S9/WithBackground/Posing.55011271/2.jpg")
    assert manifest.summary.layout.protocol == "h36m" and manifest.summary.num_landmarks == 17


def test_joints_are_reduced_and_scaled_and_the_background_masked(prepared):
    _, test = read_split(prepared[0], "test")
    sample = next(s for s in test.values() if s.metadata["activity"] == "walking")
    # Frame 1: joint j at x = (j / 64 + 1 / 32) * 16 = j / 4 + 0.5, y = 8.
    expected_x = [j / 4 + 0.5 for j in EVALUATED_JOINTS]
    assert sample.landmarks[:, 0] == pytest.approx(expected_x)
    assert sample.landmarks[:, 1] == pytest.approx([8.0] * 17)
    assert EVALUATED_JOINTS[:3] == (1, 2, 3) and len(EVALUATED_JOINTS) == 17
    assert (sample.image[:, :7] == 0).all() and (sample.image[:, 9:] > 150).all()


def test_the_left_right_joints_swap_under_a_flip(prepared):
    layout = prepared[1].layout
    names = prepared[1].landmark_names
    assert names[layout.flip_permutation[names.index("l_wrist")]] == "r_wrist"
    assert names[layout.flip_permutation[names.index("thorax")]] == "thorax"


def test_all_joints_and_frame_step_are_options(tmp_path):
    source = write_h36m(tmp_path / "h36m")
    options = ImportOptions(frame_step=2, all_joints=True)
    imported = collect_benchmark("h36m", source, image_size=16, options=options)
    frames = [item.metadata["frame"] for item in imported.splits["test"]]
    assert frames == [1, 1] and imported.layout.num_landmarks == 32  # Waiting 1, Walking 1


def test_a_frame_without_its_joints_names_the_file(tmp_path):
    source = write_h36m(tmp_path / "h36m")
    scipy.io.savemat(source / "S11" / "Landmarks" / "Waiting 1.54138969" / "2.mat", {"x": 1.0})
    with pytest.raises(AnnotationError, match=r"Waiting 1.54138969/2.mat: expected keypoints_2d"):
        collect_benchmark("h36m", source, image_size=16)


def test_the_command_averages_the_test_activities(prepared, tmp_path, monkeypatch):
    # An untrained tiny learner stands in for a checkpoint: the activities stored with each
    # test frame must reach the protocol, which averages per activity.
    config = load_config(overrides=["data.num_workers=0"])
    torch.manual_seed(0)
    learner = build_learner(config.model, config.loss).eval()
    monkeypatch.setattr(
        command, "load_trained", lambda uri, s3: TrainedModel(config, learner, 7, uri)
    )
    out = tmp_path / "out"
    assert command.main(["ckpt", "--data", str(prepared[0]), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["protocol"], summary["normaliser"]) == ("h36m", "image-size")
    assert sorted(summary["per_group"]) == ["waiting", "walking"]
    mean = sum(summary["per_group"].values()) / 2
    assert summary["landmark_error"] == pytest.approx(mean)
    assert "Human3.6M" in summary["reference"]


def test_periodic_validation_reads_the_activities_and_the_flip(prepared):
    data = DataConfig(num_workers=0)
    shards = resolve_shards(data, str(prepared[0]), "test", image_size=16)
    val = load_validation_set(data, shards, 16, samples=3)
    assert sorted(val.groups) == ["waiting", "waiting", "walking"]
    assert val.flip_permutation == prepared[1].layout.flip_permutation
