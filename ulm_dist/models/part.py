"""Part-based disentangling of shape and appearance (Lorenz, Bereska, Milbich and Ommer,
CVPR 2019), the `part` learner: K parts whose means are the landmarks, each with its own
appearance code.

For an image x and a warped, colour-jittered copy x' of it (`data.pairs: warped`), which are
the paper's spatially and appearance-transformed views of one image:
    mu = E_p(x), mu' = E_p(x')                  part means (the landmarks), through the
                                                heatmap bottleneck
    a = E_a(x, mu), a' = E_a(x', mu')           one appearance code per part, pooled under
                                                the part's Gaussian, plus a background code
    x^ = D(a', mu),  x'^ = D(a, mu')            each view in its own parts, painted with the
                                                other view's appearances
and L_recon = P(x, x^) + P(x', x'^). The other view's codes are pooled over parts that sit
elsewhere, and the part means carry no colours, so each view is best redrawn with its shape
taken from its own part means and its appearance from the codes: the disentangling.

L_equiv = |mu(S(x)) - S(mu(x))|^2 on both views, for a random similarity S per sample
(`random_similarities`), is the paper's equivariance of the part means: S is applied to the
image by `warp_images` and to points by `move_points`, its exact counterpart. Constant
landmarks do not satisfy it (S moves every point), so unlike the cycle model's
consistency terms it needs no warm-up.

The paper weighs reconstruction 1 and mean equivariance 5: set `loss.lambda_recon=1
loss.lambda_equiv=5` for its ratio (the defaults are the cycle model's, 1 and 1). Its third
term, the equivariance of each part's covariance (weight 0.1), does not apply here: the
shared bottleneck renders isotropic Gaussians of a fixed std (`model.heatmap_std`), so
there is no predicted covariance to constrain. The bottleneck, the appearance encoder, the
decoder and the perceptual network are the cycle model's own (`networks.PartAutoencoder`,
`perceptual.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ulm_dist.config import LossConfig, ModelConfig
from ulm_dist.losses import landmark_distance, perceptual_distances
from ulm_dist.models.networks import PartAutoencoder
from ulm_dist.models.perceptual import perceptual_network

# The random similarities of L_equiv, in the project's normalised coordinates (the image
# spans [-1, 1]): small enough that most of the object stays in view, as the data
# pipeline's own warps (data.warp_*).
ROTATION_STD = math.radians(10)
LOG_SCALE_STD = 0.1
SHIFT_STD = 0.1


def similarity_transforms(
    angles: torch.Tensor, log_scales: torch.Tensor, shifts: torch.Tensor
) -> torch.Tensor:
    """The point maps S(p) = s R(angle) p + shift as (B, 2, 3) matrices [s R | shift].

    angles, log_scales: (B,); shifts: (B, 2). Coordinates are normalised (x, y); on a
    square image, rotating these rotates the picture without shearing it.
    """
    cos, sin = torch.cos(angles), torch.sin(angles)
    scales = torch.exp(log_scales)
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return torch.cat([scales[:, None, None] * linear, shifts[:, :, None]], dim=-1)


def random_similarities(
    batch: int, *, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`batch` random similarity point maps (B, 2, 3), float32 (see the constants above)."""
    draws = torch.randn(batch, 4, device=device, generator=generator)
    return similarity_transforms(
        draws[:, 0] * ROTATION_STD, draws[:, 1] * LOG_SCALE_STD, draws[:, 2:] * SHIFT_STD
    )


def move_points(transforms: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """S(p) = A p + t for each sample's (2, 3) map [A | t]: points (B, K, 2) -> (B, K, 2)."""
    linear, shift = transforms[..., :2], transforms[..., 2]
    moved = points.to(linear.dtype) @ linear.transpose(1, 2) + shift[:, None]
    return moved.to(points.dtype)


def invert_affine(transforms: torch.Tensor) -> torch.Tensor:
    """[A | t] -> [A^-1 | -A^-1 t], the map that undoes each of (B, 2, 3)."""
    inverse = torch.linalg.inv(transforms[..., :2].float())
    shift = -(inverse @ transforms[..., 2:].float())
    return torch.cat([inverse, shift], dim=-1)


def warp_images(images: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """The images moved by the point maps: what was at p in images[b] is at S_b(p) after.

    grid_sample reads each output pixel q from the input at S^-1(q), so the sampling grid is
    built from the inverse map. align_corners=False is the project's pixel convention
    (`landmarks.py`). Border padding, not black: a new dark frame would give the detector
    an edge that moves with the warp but is not the object. Sampled in float32: a bf16 grid
    would misplace pixels near the border by about a quarter pixel at 128 px.
    """
    grid = F.affine_grid(invert_affine(transforms), list(images.shape), align_corners=False)
    warped = F.grid_sample(images.float(), grid, padding_mode="border", align_corners=False)
    return warped.to(images.dtype)


def part_equivariance_loss(
    detect: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    points: torch.Tensor,
    transforms: torch.Tensor,
) -> torch.Tensor:
    """|detect(S(x)) - S(detect(x))|^2, averaged over batch and parts; `points` is
    detect(images), computed by the caller (the learner has it from the reconstruction)."""
    moved = detect(warp_images(images, transforms))
    return landmark_distance(moved, move_points(transforms, points))


@dataclass
class PartOutputs:
    landmarks: torch.Tensor  # mu of the target: (B, K, 2)
    appearance: torch.Tensor  # the source's part codes: (B, K + 1, D)
    generated: torch.Tensor  # D(a_source, mu_target): (B, 3, S, S)


class PartModel(PartAutoencoder):
    """The part autoencoder without a flow head; `forward(source, target)` draws the target's
    parts in the source's appearances (the `generation_sheet` picture)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, flow_channels=0)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> PartOutputs:
        appearance = self.encode(source)[1]
        points = self.landmarks(target)
        return PartOutputs(points, appearance, self.decode(appearance, points))


class PartLearner(nn.Module):
    """`forward(image, warped)` returns {"recon", "equiv", "total"} scalars; each term sums
    the two views' batch means, as the cycle learner does for its image pair."""

    def __init__(self, model_config: ModelConfig, loss_config: LossConfig):
        super().__init__()
        self.model = PartModel(model_config)
        self.vgg = perceptual_network(loss_config)
        self.compare_pixels = "pixels" in loss_config.perceptual_layers
        self.weights = {"recon": loss_config.lambda_recon, "equiv": loss_config.lambda_equiv}

    def landmarks(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.landmarks(images)

    def forward(self, image: torch.Tensor, warped: torch.Tensor) -> dict[str, torch.Tensor]:
        n = image.shape[0]
        # Both views through each network as one batch: same maths, half the launches.
        views = torch.cat([image, warped])
        points, appearance, _ = self.model.encode(views)
        a_image, a_warped = appearance.split(n)
        redrawn = self.model.decode(torch.cat([a_warped, a_image]), points)
        recon_image, recon_warped = (
            d.mean()
            for d in perceptual_distances(views, redrawn, self.vgg, self.compare_pixels).chunk(2)
        )
        transforms = random_similarities(2 * n, device=views.device)
        # One detector pass over both views: twice the mean over 2n is the sum of two means.
        equiv = 2 * part_equivariance_loss(self.model.landmarks, views, points, transforms)
        losses = {"recon": recon_image + recon_warped, "equiv": equiv}
        losses["total"] = sum(self.weights[name] * value for name, value in losses.items())
        return losses
