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

Lorenz et al.'s equivariance of the part means, |mu(S(x)) - S(mu(x))|^2 for random
similarities S, is the shared prior L_transform (`priors.py`), which every learner adds; its
default weight, 5 to reconstruction's 1, is the paper's. The paper's third term, the
equivariance of each part's covariance (weight 0.1), does not apply here: the shared
bottleneck renders isotropic Gaussians of a fixed std (`model.heatmap_std`), so there is no
predicted covariance to constrain. The bottleneck, the appearance encoder, the decoder and
the perceptual network are the cycle model's own (`networks.PartAutoencoder`,
`perceptual.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ulm_dist.config import LossConfig, ModelConfig
from ulm_dist.models.learner import Learner, PairViews, generation_views
from ulm_dist.models.networks import PartAutoencoder


@dataclass
class PartOutputs:
    landmarks: torch.Tensor  # mu of the target: (B, K, 2)
    appearance: torch.Tensor  # the source's part codes: (B, K + 1, D)
    generated: torch.Tensor  # D(a_source, mu_target): (B, 3, S, S)


class PartModel(PartAutoencoder):
    """The part autoencoder without a flow head; `forward(source, target)` draws the target's
    parts in the source's appearances."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, flow_channels=0)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> PartOutputs:
        appearance = self.encode(source)[1]
        points = self.landmarks(target)
        return PartOutputs(points, appearance, self.decode(appearance, points))

    def views(self, source: torch.Tensor, target: torch.Tensor) -> PairViews:
        """The part swap: the target's parts in the source's appearances."""
        return generation_views(source, target, self(source, target))


class PartLearner(Learner):
    """`forward(image, warped)` returns {"recon", "total"} and the priors' scalars; recon
    sums the two views' batch means, as the cycle learner does for its image pair."""

    def __init__(self, model_config: ModelConfig, loss_config: LossConfig):
        super().__init__(PartModel(model_config), loss_config, {"recon": loss_config.lambda_recon})

    def forward(self, image: torch.Tensor, warped: torch.Tensor) -> dict[str, torch.Tensor]:
        n = image.shape[0]
        # Both views through each network as one batch: same maths, half the launches.
        views = torch.cat([image, warped])
        pose, appearance = self.model.encode(views)
        a_image, a_warped = appearance.split(n)
        redrawn = self.model.decode(torch.cat([a_warped, a_image]), pose.points)
        recon_image, recon_warped = (d.mean() for d in self.perceptual(views, redrawn).chunk(2))
        losses = {"recon": recon_image + recon_warped, **self.priors(views, pose)}
        return self.with_total(losses, self.weights)
