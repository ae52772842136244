"""The field's landmark-regression protocol (Thewlis et al. 2017; Jakab et al. 2018).

Freeze the detector; on annotated training images fit a linear map from the K discovered
points to the L annotated ones; report on held-out images the mean point-to-point error
divided by the inter-ocular distance, in percent. Coordinates are pixels, as in Jakab et
al.'s code, and the map has no intercept by default, as there (`bias=True` adds one). The
reverse direction (annotated -> discovered, Sanchez and Tzimiropoulos 2019) tells whether
the discovered points carry more than the annotated ones. The mean-shape baseline predicts
the training set's mean annotated shape for every image: a model must beat it by a wide
margin to have learned anything. Landmark layouts without eyes are normalised by the diagonal
of the annotated points' bounding box instead, and the benchmarks whose protocol says so by
the image's side (`protocols.py`). With visibility flags (CUB's parts), each annotated
landmark's map is fit on the images where it is visible and errors count only visible points.
Human3.6M's protocol scores each image by the better of its annotation and the left-right
swapped one, and averages per activity before averaging the activities (`summary_error`).

The command line, `python -m ulm_dist.evaluate CHECKPOINT --data ...`, is in `command.py`;
periodic evaluation during training is in `periodic.py`; both run the detector through
`annotated.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

NORMALISERS = ("inter-ocular", "bbox-diagonal", "image-size")

# The protocol's metrics; periodic evaluation reports them prefixed with VAL_PREFIX.
LANDMARK_ERROR = "landmark_error"
LANDMARK_ERROR_REVERSE = "landmark_error_reverse"
MEAN_SHAPE_ERROR = "mean_shape_error"
VAL_PREFIX = "val/"
# What Ray Tune optimises and export selects checkpoints by; lower is better.
VAL_LANDMARK_ERROR = VAL_PREFIX + LANDMARK_ERROR


@dataclass
class RegressionReport:
    error: float  # percent of the normaliser, discovered -> annotated
    # percent of the normaliser, annotated -> discovered; NaN with invisible annotated points,
    # which cannot serve as the map's inputs
    reverse_error: float
    baseline_error: float  # percent, the mean annotated shape for every image
    per_landmark: list[float]  # percent, one per annotated landmark
    predicted: torch.Tensor  # (N, L, 2) the test images' regressed landmarks, pixels
    # percent, per group of test images (Human3.6M: per activity), when the protocol groups
    per_group: dict[str, float] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            prefix + LANDMARK_ERROR: self.error,
            prefix + LANDMARK_ERROR_REVERSE: self.reverse_error,
            prefix + MEAN_SHAPE_ERROR: self.baseline_error,
        }


def fit_linear_map(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: bool = False,
    ridge: float = 0.0,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Least squares W with targets ~ [inputs, 1?] @ W. inputs (N, K, 2), targets (N, L, 2).
    With `visible` (N, L) bool, the two columns of target landmark l are fit on the images
    where l is visible only (a landmark visible nowhere gets zero weights)."""
    x = _design(inputs, bias).double()
    y = targets.flatten(1).double()
    eye = ridge * torch.eye(x.shape[1], dtype=x.dtype)
    if visible is None:
        return torch.linalg.lstsq(x.T @ x + eye, x.T @ y).solution
    # Each column's rows weighted 1 (visible) or 0: the normal equations per landmark.
    weights = visible.double().repeat_interleave(2, dim=1)
    columns = [
        torch.linalg.lstsq(x.T @ (x * w[:, None]) + eye, x.T @ (w * y[:, c])).solution
        for c, w in enumerate(weights.T)
    ]
    return torch.stack(columns, dim=1)


def apply_linear_map(
    weights: torch.Tensor, inputs: torch.Tensor, bias: bool = False
) -> torch.Tensor:
    out = _design(inputs, bias).double() @ weights
    return out.reshape(inputs.shape[0], -1, 2).float()


def inter_ocular_distance(
    points: torch.Tensor, eye_left: tuple[int, ...], eye_right: tuple[int, ...]
) -> torch.Tensor:
    """Distance between the eye centres, each the mean of its listed points. (N, L, 2) -> (N,)."""
    left = points[:, list(eye_left)].mean(dim=1)
    right = points[:, list(eye_right)].mean(dim=1)
    return (left - right).norm(dim=-1)


def bounding_box_diagonal(points: torch.Tensor) -> torch.Tensor:
    """Diagonal of the box around each image's points: (N, L, 2) -> (N,)."""
    return (points.amax(dim=1) - points.amin(dim=1)).norm(dim=-1)


def masked_mean(
    values: torch.Tensor, visible: torch.Tensor | None, dim: int | None = None
) -> torch.Tensor:
    """Mean of `values` (N, L) over the visible entries (all when `visible` is None); NaN
    where nothing is visible."""
    if visible is None:
        return values.mean() if dim is None else values.mean(dim=dim)
    mask = visible.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim)


def normalised_errors(
    predicted: torch.Tensor, annotated: torch.Tensor, normaliser: torch.Tensor
) -> torch.Tensor:
    """Point-to-point distance over the per-image normaliser, in percent: (N, L)."""
    return 100 * (predicted - annotated).norm(dim=-1) / normaliser.clamp_min(1e-8)[:, None]


def image_errors(
    predicted: torch.Tensor,
    annotated: torch.Tensor,
    normaliser: torch.Tensor,
    flip_permutation: Sequence[int] | None = None,
) -> torch.Tensor:
    """Each image's mean normalised point error, in percent: (N,). With `flip_permutation`,
    the smaller of the errors against the annotation and against its left-right swapped
    copy (`annotated[:, flip_permutation]`), as keypointgan's `compute_mean_distance` scores
    Human3.6M: a detector that confuses a person's left and right is not penalised."""
    errors = normalised_errors(predicted, annotated, normaliser).mean(dim=1)
    if flip_permutation is None:
        return errors
    swapped = annotated[:, list(flip_permutation)]
    return torch.minimum(errors, normalised_errors(predicted, swapped, normaliser).mean(dim=1))


def group_means(values: torch.Tensor, groups: Sequence[str]) -> dict[str, float]:
    """The mean of `values` (N,) over each group's members, by group name (sorted)."""
    if len(groups) != len(values):
        raise ValueError(f"expected one group per value ({len(values)}), got {len(groups)}")
    return {
        name: values[torch.tensor([g == name for g in groups])].mean().item()
        for name in sorted(set(groups))
    }


def summary_error(
    predicted: torch.Tensor,
    annotated: torch.Tensor,
    normaliser: torch.Tensor,
    *,
    visible: torch.Tensor | None = None,
    flip_permutation: Sequence[int] | None = None,
    groups: Sequence[str] | None = None,
) -> tuple[float, dict[str, float]]:
    """The protocol's one number, percent, and its per-group means. Without a flip or groups,
    the mean over every (visible) annotated point of every image. With them (Human3.6M), each
    image's error (`image_errors`), averaged within each group, then the groups' means
    averaged, each group counting once whatever its size (keypointgan's
    `mean_distance_per_activity`)."""
    if flip_permutation is None and groups is None:
        return masked_mean(normalised_errors(predicted, annotated, normaliser), visible).item(), {}
    if visible is not None:
        raise ValueError("the left-right flip and the groups apply to fully annotated images only")
    per_image = image_errors(predicted, annotated, normaliser, flip_permutation)
    if groups is None:
        return per_image.mean().item(), {}
    per_group = group_means(per_image, groups)
    return sum(per_group.values()) / len(per_group), per_group


def landmark_regression(
    train_discovered: torch.Tensor,
    train_annotated: torch.Tensor,
    test_discovered: torch.Tensor,
    test_annotated: torch.Tensor,
    *,
    eyes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    bias: bool = False,
    ridge: float = 0.0,
    image_size: float | None = None,
    train_visible: torch.Tensor | None = None,
    test_visible: torch.Tensor | None = None,
    flip_permutation: Sequence[int] | None = None,
    test_groups: Sequence[str] | None = None,
) -> RegressionReport:
    """The whole protocol on pixel coordinates: discovered (N, K, 2), annotated (N, L, 2).
    Errors are normalised by the inter-ocular distance given the eye indices (left, right),
    else by `image_size` (the side of the images, pixels) given that, else by the
    bounding-box diagonal. `train_visible`, `test_visible` (N, L) bool: fit and score only
    the visible annotated points (both or neither). `flip_permutation` and `test_groups`
    (one name per test image): score as `summary_error` says (the reverse error and the
    per-landmark errors stay unflipped and pooled)."""
    if (train_visible is None) != (test_visible is None):
        raise ValueError("give the visibility of both the fit and the test images, or neither")
    forward = fit_linear_map(
        train_discovered, train_annotated, bias=bias, ridge=ridge, visible=train_visible
    )
    predicted = apply_linear_map(forward, test_discovered, bias)
    if eyes is not None:
        normaliser = inter_ocular_distance(test_annotated, *eyes)
    elif image_size is not None:
        normaliser = torch.full((len(test_annotated),), float(image_size))
    else:
        normaliser = bounding_box_diagonal(test_annotated)
    errors = normalised_errors(predicted, test_annotated, normaliser)
    scoring = {"visible": test_visible, "flip_permutation": flip_permutation, "groups": test_groups}
    error, per_group = summary_error(predicted, test_annotated, normaliser, **scoring)

    reverse_error = float("nan")
    if train_visible is None or (train_visible.all() and test_visible.all()):
        backward = fit_linear_map(train_annotated, train_discovered, bias=bias, ridge=ridge)
        reverse = normalised_errors(
            apply_linear_map(backward, test_annotated, bias), test_discovered, normaliser
        )
        reverse_error = reverse.mean().item()
    if train_visible is None:
        mean_shape = train_annotated.mean(dim=0, keepdim=True)
    else:
        weight = train_visible.to(train_annotated.dtype)[..., None]
        mean_shape = (train_annotated * weight).sum(0, keepdim=True) / weight.sum(0).clamp_min(1)
    baseline, _ = summary_error(
        mean_shape.expand_as(test_annotated), test_annotated, normaliser, **scoring
    )
    return RegressionReport(
        error=error,
        reverse_error=reverse_error,
        baseline_error=baseline,
        per_landmark=masked_mean(errors, test_visible, dim=0).tolist(),
        predicted=predicted,
        per_group=per_group,
    )


def _design(points: torch.Tensor, bias: bool) -> torch.Tensor:
    x = points.flatten(1)
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1) if bias else x
