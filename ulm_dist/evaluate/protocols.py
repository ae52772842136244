"""The evaluation protocol of each benchmark, chosen from the layout in a split's manifest.

A protocol fixes what `regression.landmark_regression` is given: the normaliser, whether only
visible annotated points count, whether a left-right swapped annotation may score an image,
the per-image metadata field whose groups are averaged separately, and the split the
regressor is fit on (the splits that `python -m ulm_dist.data prepare` writes; the error is
reported on `test`, whose manifest names the protocol). Data sets without a benchmark protocol
(faces68, the synthetic set, any `build` from a folder) keep the generic rule: fit on
`train`, test on `test`, inter-ocular distance when the layout names eyes, else the diagonal
of the annotated points' bounding box.

The protocols, with where they are published. No section or table number is given because
none could be verified: the papers' full texts could not be read here (the reference notes
and the pages found carry their abstracts and a few numbers, not their section structure).
Each citation names the paper's experiment on that data set and the code that was read.

- `mafl`: Jakab et al., "Unsupervised Learning of Object Landmarks through Conditional Image
  Generation", NeurIPS 2018, experiments on faces (following Thewlis et al., ICCV 2017): a
  linear map without intercept from the K discovered points to the 5 annotated ones, fit on
  MAFL's 19,000 training faces, tested on its 1,000 test faces; the mean point distance over
  the inter-ocular distance (the two eye points). Zhang et al., "Unsupervised Discovery of
  Object Landmarks as Structural Representations", CVPR 2018, experiments on CelebA/MAFL: the
  same splits and normaliser (code: YutingZhang/lmdis-rep evaluation/face_evaluation.m and
  mean_error_IOD.m; IMM's scripts/test.py). The fit uses all of `mafl_train`, as the papers
  describe it; IMM's `celeba_dataset.py` fits on MAFL's training list less its last tenth.
- `aflw`: the same regression and normaliser on AFLW's MAFL-style 5 points, fit on its
  10,122 training faces, tested on its 2,995 test faces (Jakab et al. 2018 and Zhang et al.
  2018, experiments on AFLW; the same code). IMM's `aflw_dataset.py` fits on the training
  list less its last tenth; here all of `train`.
- `cub`: CUB-200-2011's 15 parts, fit on the official training images, tested on the test
  images, each part fit and scored only where it is annotated as visible; the error over the
  side of the image, which the importer makes the bird's bounding box squared, i.e. over the
  box's longer side (Zhang et al. 2018 and Lorenz et al., "Unsupervised Part-Based
  Disentangling of Object Shape and Appearance", CVPR 2019, experiments on CUB). The image
  side is the normaliser that later papers state when they tabulate these methods' CUB
  errors ("Pose Prior Learner", Table 1: Zhang et al. 2018 at 5.36%). The original papers'
  text was not read, and Zhang et al.'s code has no CUB evaluation (lmdis-rep's
  mean_error_IOD.m has no 15-point case). Lorenz et al.'s images are their own aligned
  crops, not squared boxes (`cub.py`).
- `h36m`: the simplified Human3.6M, fit on subjects S1-S9, tested on S11, scored as
  tomasjakab/keypointgan `test_pose.py` scores it (Jakab et al., "Self-supervised Learning of
  Interpretable Keypoints from Unlabelled Videos", CVPR 2020, the code that compares against
  Zhang et al. and Lorenz et al.): each image's mean joint error over the image side, the
  smaller of the errors against the annotation and against its left-right swap
  (`compute_mean_distance`), averaged per activity, then over the six activities
  (`mean_distance_per_activity`). Its evaluation config (`configs/test_simple_human.yaml`)
  has `used_points: all`, `error_form: image_size` and every frame (`sample_window: [0, 1]`),
  and Zhang et al.'s `evaluation/mean_error_IOD.m` divides 32 points in [0, 1] by 1: the
  numbers compared there (Lorenz et al. 2019's 2.79, "normalised by image size", whose own
  joint set was not verified) are over all 32 joints, so prepare with `--all-joints` to
  compare with them; the default 17 joints are keypointgan's `official_eval` set
  (`used_points: original`). Zhang et al.'s
  own code pools all images and has no swap, so the papers' numbers were not all computed
  one way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ulm_dist.data import ShardSet
from ulm_dist.data.manifest import DatasetSummary
from ulm_dist.evaluate.annotated import EvaluationError
from ulm_dist.evaluate.regression import NORMALISERS

# The left and the right eye's landmark indices, for the inter-ocular distance.
Eyes = tuple[tuple[int, ...], tuple[int, ...]]


class ProtocolError(EvaluationError):
    """A normaliser the shards' layout cannot give; the message says what to use instead."""


@dataclass(frozen=True)
class EvaluationProtocol:
    name: str
    normaliser: str  # one of regression.NORMALISERS
    fit_split: str  # the split the regressor is fit on (the error is reported on `test`)
    visible_only: bool  # fit and score only the points annotated as visible
    reference: str  # where the protocol is published; written into summary.json
    # Score each image by the smaller error of the annotation and its left-right swap.
    flip_min: bool = False
    # The metadata field whose groups are averaged separately, then the groups' means.
    group_by: str | None = None


PROTOCOLS = {
    "mafl": EvaluationProtocol(
        "mafl",
        "inter-ocular",
        "mafl_train",
        False,
        "Jakab et al. 2018 (NeurIPS), MAFL experiments; Zhang et al. 2018 (CVPR), CelebA/MAFL "
        "experiments; code: tomasjakab/imm, YutingZhang/lmdis-rep",
    ),
    "aflw": EvaluationProtocol(
        "aflw",
        "inter-ocular",
        "train",
        False,
        "Jakab et al. 2018 (NeurIPS) and Zhang et al. 2018 (CVPR), AFLW experiments; code: "
        "tomasjakab/imm, YutingZhang/lmdis-rep",
    ),
    "cub": EvaluationProtocol(
        "cub",
        "image-size",
        "train",
        True,
        "Zhang et al. 2018 (CVPR) and Lorenz et al. 2019 (CVPR), CUB-200-2011 experiments; "
        "code: YutingZhang/lmdis-rep",
    ),
    "h36m": EvaluationProtocol(
        "h36m",
        "image-size",
        "train",
        False,
        "Zhang et al. 2018 (CVPR) and Lorenz et al. 2019 (CVPR), Human3.6M experiments; "
        "code: tomasjakab/keypointgan test_pose.py",
        flip_min=True,
        group_by="activity",
    ),
}
GENERIC_FIT_SPLIT = "train"


def protocol_of(summary: DatasetSummary | None) -> EvaluationProtocol | None:
    """The benchmark protocol a manifest's layout names, or None for the generic one."""
    layout = summary.layout if summary else None
    if layout is None or layout.protocol is None:
        return None
    if layout.protocol not in PROTOCOLS:
        raise ProtocolError(
            f"the shards' layout names the protocol {layout.protocol!r}, which this version "
            f"does not know (it knows {sorted(PROTOCOLS)}); update ulm_dist"
        )
    return PROTOCOLS[layout.protocol]


@dataclass(frozen=True)
class Normalisation:
    """What the errors are divided by, as `landmark_regression` takes it."""

    name: str  # one of regression.NORMALISERS
    eyes: Eyes | None = None  # inter-ocular
    image_size: int | None = None  # image-size: the side of the evaluated images, pixels


def choose_normalisation(
    shards: ShardSet, image_size: int, normaliser: str | None = None
) -> Normalisation:
    """The normaliser `normaliser` (None: the shards' protocol's, else inter-ocular when their
    layout names eyes, else the bounding-box diagonal) for images of `image_size` pixels."""
    assert normaliser is None or normaliser in NORMALISERS, normaliser
    summary = shards.summary
    layout = summary.layout if summary else None
    if normaliser is None:
        protocol = protocol_of(summary)
        if protocol is not None:
            normaliser = protocol.normaliser
        else:
            normaliser = "inter-ocular" if layout and layout.has_eyes else "bbox-diagonal"
    if normaliser == "inter-ocular":
        if layout is None or not layout.has_eyes:
            raise ProtocolError(
                "--normaliser inter-ocular: the shards' manifest has no landmark layout naming "
                "the eyes; use --normaliser bbox-diagonal, or rebuild the shards with --layout"
            )
        return Normalisation(normaliser, eyes=(layout.eye_left, layout.eye_right))
    if normaliser == "image-size":
        return Normalisation(normaliser, image_size=image_size)
    return Normalisation(normaliser)


def fit_split_for(protocol: EvaluationProtocol | None) -> str:
    """The split the regressor is fit on under `protocol` (None: the generic `train`)."""
    return protocol.fit_split if protocol else GENERIC_FIT_SPLIT


def uses_visibility(shards: ShardSet) -> bool:
    """Whether the shards' protocol counts only the visible annotated points."""
    protocol = protocol_of(shards.summary)
    return protocol is not None and protocol.visible_only


def flip_permutation_for(shards: ShardSet) -> tuple[int, ...] | None:
    """The layout's left-right permutation when the shards' protocol scores the better of an
    annotation and its mirror (Human3.6M), else None."""
    protocol = protocol_of(shards.summary)
    if protocol is None or not protocol.flip_min:
        return None
    assert shards.summary is not None and shards.summary.layout is not None
    return shards.summary.layout.flip_permutation


def groups_for(shards: ShardSet, metadata: Sequence[dict[str, Any]]) -> list[str] | None:
    """Each image's group (its metadata field named by the protocol's `group_by`), or None
    when the shards' protocol does not group."""
    protocol = protocol_of(shards.summary)
    if protocol is None or protocol.group_by is None:
        return None
    field = protocol.group_by
    lacking = sum(1 for record in metadata if field not in record)
    if lacking:
        raise ProtocolError(
            f"the {protocol.name} protocol averages per {field}, but {lacking} of "
            f"{len(metadata)} images have no {field!r} in their metadata; rebuild the shards "
            f"with `python -m ulm_dist.data prepare {protocol.name}`"
        )
    return [str(record[field]) for record in metadata]
