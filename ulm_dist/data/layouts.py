"""Landmark layouts: what each annotated point means, as far as evaluation and flips need.

A layout travels in a split's manifest summary. Evaluation normalises errors by the distance
between the eye centres (each the mean of the listed landmarks, MAFL/300-W convention), and
flip augmentation re-indexes landmarks with `flip_permutation` so that index k keeps its
meaning ("the image-left eye") after a horizontal flip. A layout without eyes (birds' parts,
human joints) leaves both eye tuples empty. A benchmark's layout also names its evaluation
`protocol` (`ulm_dist.evaluate.protocols`): the normaliser, the visibility rule and the splits
its regressor is fit and tested on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LandmarkLayout:
    eye_left: tuple[int, ...]
    eye_right: tuple[int, ...]
    # flip_permutation[k] is the index whose point becomes landmark k after a horizontal flip.
    flip_permutation: tuple[int, ...]
    # The benchmark whose evaluation protocol applies (a key of evaluate.protocols.PROTOCOLS),
    # or None for the generic one (inter-ocular when there are eyes).
    protocol: str | None = None

    def __post_init__(self) -> None:
        count = len(self.flip_permutation)
        if sorted(self.flip_permutation) != list(range(count)):
            raise ValueError(
                f"flip_permutation must be a permutation of 0..{count - 1}, "
                f"got {list(self.flip_permutation)}"
            )
        if bool(self.eye_left) != bool(self.eye_right):
            raise ValueError(
                f"eye_left {self.eye_left} and eye_right {self.eye_right}: expected both eyes "
                "or neither (a layout without eyes)"
            )
        for name, indices in (("eye_left", self.eye_left), ("eye_right", self.eye_right)):
            if not all(0 <= i < count for i in indices):
                raise ValueError(f"{name}: expected indices in 0..{count - 1}, got {indices}")
        mirrored = {self.flip_permutation[k] for k in self.eye_left}
        if mirrored != set(self.eye_right):
            raise ValueError(
                f"flip_permutation must map the left-eye points {list(self.eye_left)} onto the "
                f"right-eye points {list(self.eye_right)}, got {sorted(mirrored)}"
            )

    @property
    def num_landmarks(self) -> int:
        return len(self.flip_permutation)

    @property
    def has_eyes(self) -> bool:
        return bool(self.eye_left)


def _mirror_pairs(count: int, pairs: list[tuple[int, int]]) -> tuple[int, ...]:
    permutation = list(range(count))
    for a, b in pairs:
        permutation[a], permutation[b] = b, a
    return tuple(permutation)


# The 68-point iBUG / 300-W layout (0-based): jaw 0-16, brows 17-26, nose 27-35, eyes 36-47,
# mouth 48-67. Image-left eye = 36-41 (the subject's right eye).
IBUG68 = LandmarkLayout(
    eye_left=(36, 37, 38, 39, 40, 41),
    eye_right=(42, 43, 44, 45, 46, 47),
    flip_permutation=_mirror_pairs(
        68,
        [(i, 16 - i) for i in range(8)]
        + [(17 + i, 26 - i) for i in range(5)]
        + [(31, 35), (32, 34)]
        + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
        + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]
        + [(60, 64), (61, 63), (65, 67)],
    ),
)

KNOWN_LAYOUTS = {"ibug68": IBUG68}


def flip_landmarks(points: np.ndarray, width: float, permutation: tuple[int, ...]) -> np.ndarray:
    """Landmarks (L, 2) in pixels after mirroring an image of `width` pixels left-right."""
    mirrored = points.copy()
    mirrored[:, 0] = width - points[:, 0]
    return mirrored[list(permutation)]


# The MAFL 5-point protocol on 68-point annotations: the eye centres (means of the eye
# contours), the nose tip and the mouth corners, in that order.
MAFL5 = LandmarkLayout(eye_left=(0,), eye_right=(1,), flip_permutation=(1, 0, 2, 4, 3))
MAFL5_NAMES = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")
_MAFL5_FROM_IBUG68 = ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47), (30,), (48,), (54,))


def ibug68_to_mafl5(points: np.ndarray) -> np.ndarray:
    """(..., 68, 2) iBUG points -> (..., 5, 2) MAFL points (see MAFL5)."""
    return np.stack([points[..., list(group), :].mean(axis=-2) for group in _MAFL5_FROM_IBUG68], -2)


@dataclass(frozen=True)
class LandmarkReduction:
    """A fixed map from a rich annotation (e.g. 68 points) to an evaluation protocol's points,
    applied when shards are built so that the manifest carries the protocol's layout."""

    source_count: int
    layout: LandmarkLayout
    names: tuple[str, ...]
    reduce: Callable[[np.ndarray], np.ndarray]  # (..., source_count, 2) -> (..., L, 2)


LANDMARK_REDUCTIONS = {
    "mafl5": LandmarkReduction(
        source_count=IBUG68.num_landmarks,
        layout=MAFL5,
        names=MAFL5_NAMES,
        reduce=ibug68_to_mafl5,
    )
}
