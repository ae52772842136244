"""Human3.6M (Ionescu et al. 2014) in the simplified form of Zhang et al. 2018, which Lorenz
et al. 2019 and Jakab et al. 2020 also use: six activities, subjects S1, S5, S6, S7, S8 and
S9 for training and S11 for testing, background-removal masks.

SRC is that release as distributed, one folder per subject and per sequence:

    SRC/S1/WithBackground/Directions 1.54138969/1.jpg ...   the frames
    SRC/S1/BackgroudMask/Directions 1.54138969/1.png ...    their masks (the publisher's
                                                            spelling), 0 background
    SRC/S1/Landmarks/Directions 1.54138969/1.mat ...        `keypoints_2d`: (32, 2) joints
                                                            (x, y) in [0, 1] of the frame

(checked against tomasjakab/keypointgan `data/simplehuman36m_dataset.py`: frames listed
from the mask folders, `keypoints_2d` times the 128-pixel side, masks multiplied into the
frames). The activities are directions, discussion, greeting, posing, waiting and walking;
a sequence belongs to one when the first word of its folder name is that activity.

The 32 motion-capture joints hold duplicates and joints that never move independently; they
are reduced to the 17 that keypointgan's `data/human36m_skeleton.py` names `official_eval`,
in index order, or kept whole with `all_joints`. The published numbers are over all 32:
keypointgan's test config (`configs/test_simple_human.yaml`, `used_points: all`) and Zhang et
al.'s `evaluation/mean_error_IOD.m` take every joint, so prepare with `all_joints` to compare
with them. Splits: `train` (S1-S9), `test` (S11) and `val`, the last
tenth of `train` (in subject and sequence order: S9's last sequences), for choosing
checkpoints. Each sample's metadata holds its subject, activity, sequence and frame; the
evaluation protocol averages the error per `activity` (`ulm_dist.evaluate.protocols`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ulm_dist.data.benchmarks.annotation_files import AnnotationError, load_mat
from ulm_dist.data.benchmarks.importer import (
    WHOLE_IMAGE,
    BenchmarkImport,
    BenchmarkItem,
    ImportOptions,
    present_splits,
)
from ulm_dist.data.layouts import LandmarkLayout

NAME = "h36m"
PROTOCOL = "h36m"
# keypoints_2d are fractions of the frame in [0, 1], continuous: keypointgan multiplies them
# by the frame's 128 pixels and uses them as they are (simplehuman36m_dataset.py), so no
# shift. Whether 0 and 1 are the frame's edges or its outer pixels' centres (a 1/128 shift)
# was not verified: the release's generating code was not found.
PIXEL_ORIGIN = 0.0
ACTIVITIES = ("directions", "discussion", "greeting", "posing", "waiting", "walking")
TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8", "S9")
TEST_SUBJECTS = ("S11",)
FRAMES, MASKS, LANDMARKS = "WithBackground", "BackgroudMask", "Landmarks"

# The 32 joints by index, as keypointgan's data/human36m_skeleton.py names them.
JOINT_NAMES = (
    "hip", "r_hip", "r_knee", "r_ankle", "r_ball", "r_toes", "l_hip", "l_knee", "l_ankle",
    "l_ball", "l_toes", "pelvis", "thorax", "neck", "head_center", "head_back", "l_unknown",
    "l_shoulder", "l_elbow", "l_wrist", "l_wrist_2", "l_thumb", "l_little", "l_little_2",
    "r_unknown", "r_shoulder", "r_elbow", "r_wrist", "r_wrist_2", "r_thumb", "r_little",
    "r_little_2",
)  # fmt: skip
# keypointgan's official_eval joints, sorted by index as its test_pose.py uses them.
EVALUATED_JOINTS = (1, 2, 3, 6, 7, 8, 11, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27)


def joint_layout(joints: tuple[int, ...]) -> tuple[LandmarkLayout, tuple[str, ...]]:
    """The layout of the kept `joints`: no eyes, each l_X swapped with r_X under a flip."""
    names = tuple(JOINT_NAMES[j] for j in joints)
    position = {name: k for k, name in enumerate(names)}
    permutation = [position.get(_mirrored(name), k) for k, name in enumerate(names)]
    layout = LandmarkLayout((), (), tuple(permutation), protocol=PROTOCOL)
    return layout, names


def _mirrored(name: str) -> str:
    sides = {"l_": "r_", "r_": "l_"}
    return sides[name[:2]] + name[2:] if name[:2] in sides else name


def activity_of(sequence: str) -> str | None:
    """The activity of a sequence folder such as "Directions 1.54138969", or None."""
    word = sequence.replace(".", " ").split()[0].lower() if sequence.strip() else ""
    return word if word in ACTIVITIES else None


def read_keypoints(path: Path) -> np.ndarray:
    mat = load_mat(path, "a frame's joints (keypoints_2d)")
    points = mat.get("keypoints_2d")
    if points is None or np.shape(points) != (len(JOINT_NAMES), 2):
        found = "no keypoints_2d" if points is None else f"shape {np.shape(points)}"
        raise AnnotationError(
            f"{path}: expected keypoints_2d of shape ({len(JOINT_NAMES)}, 2), (x, y) in "
            f"[0, 1], found {found}"
        )
    return np.asarray(points, np.float64)


def subject_items(
    source: Path,
    subject: str,
    joints: tuple[int, ...],
    frame_step: int,
    with_masks: bool,
) -> list[BenchmarkItem]:
    masks = source / subject / MASKS
    if not masks.is_dir():
        raise FileNotFoundError(
            f"{masks}: no such folder; expected the subject's mask folders (SRC/{subject}/"
            f"{MASKS}/<sequence>/<frame>.png), as the simplified Human3.6M release has them"
        )
    items = []
    for sequence in sorted(p.name for p in masks.iterdir() if p.is_dir()):
        activity = activity_of(sequence)
        if activity is None:
            continue
        frames = sorted(int(p.stem) for p in (masks / sequence).glob("*.png") if p.stem.isdigit())
        for frame in frames[::frame_step]:
            landmarks_file = source / subject / LANDMARKS / sequence / f"{frame}.mat"
            if not landmarks_file.is_file():
                raise FileNotFoundError(
                    f"{landmarks_file}: no such file; every mask of the release has the "
                    "frame's joints beside it"
                )
            items.append(
                BenchmarkItem(
                    key=f"{subject}/{sequence.replace('.', '_').replace(' ', '_')}/{frame:06d}",
                    image=source / subject / FRAMES / sequence / f"{frame}.jpg",
                    landmarks=read_keypoints(landmarks_file)[list(joints)],
                    region=WHOLE_IMAGE,
                    annotated_size=(1.0, 1.0),
                    origin_offset=PIXEL_ORIGIN,
                    mask=masks / sequence / f"{frame}.png" if with_masks else None,
                    metadata={
                        "subject": subject,
                        "activity": activity,
                        "sequence": sequence,
                        "frame": frame,
                    },
                )
            )
    return items


def collect(source: Path, image_size: int, options: ImportOptions) -> BenchmarkImport:
    del image_size  # the whole frame is resized
    frame_step, all_joints = options.frame_step, options.all_joints
    keep_background = options.keep_background
    if frame_step < 1:
        raise ValueError(f"frame_step: expected 1 or more, got {frame_step}")
    joints = tuple(range(len(JOINT_NAMES))) if all_joints else EVALUATED_JOINTS
    layout, names = joint_layout(joints)
    candidates = {
        split: [
            item
            for subject in subjects
            for item in subject_items(source, subject, joints, frame_step, not keep_background)
        ]
        for split, subjects in (("train", TRAIN_SUBJECTS), ("test", TEST_SUBJECTS))
    }
    splits, missing = present_splits(candidates, val_of="train")
    return BenchmarkImport(
        name=NAME,
        splits=splits,
        missing=missing,
        layout=layout,
        landmark_names=names,
        source=f"simplified Human3.6M ({source.resolve()}), {len(joints)} joints, every "
        f"{frame_step} frame(s), "
        + ("backgrounds kept" if keep_background else "backgrounds masked"),
        metadata_fields=("subject", "activity", "sequence", "frame"),
    )
