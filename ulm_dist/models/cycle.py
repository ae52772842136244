"""Unsupervised landmark learning from unpaired data (Xu et al. 2020, arXiv 2007.01053).

For an unpaired pair (I_i, I_j):
    a = E_a(I), p = E_p(I)                      appearance and pose of each image
    I_ij = D(a_i, p_j),  I_ji = D(a_j, p_i)     swap: i's appearance in j's pose, and back
    a_i', p_j' = E(I_ij);  a_j', p_i' = E(I_ji) re-encode the swaps
    I_i' = D(a_i', p_i'), I_j' = D(a_j', p_j')  and put everything back together

L_cycle compares I_i' with I_i, L_inv the re-encoded poses with the originals, and L_equiv
the landmarks of one image with those of the other carried across by the flow module.

Not in the paper: L_recon, the one-hop reconstruction of Jakab et al. and Lorenz et al. At
initialisation every landmark sits at the image centre, and the cycle's two-hop signal is
too weak to move them; the one-hop term gives the decoder a direct reason to use the
landmarks. By default (`loss.recon_appearance=transformed`) it takes the appearance codes
from a random warp W of the image, L_recon = P(I_i, D(E_a(W(I_i)), p_i)) + (same for j),
as Lorenz et al. take them from another view: codes pooled from the image itself,
D(a_i, p_i) (`same`), also carry its geometry (the global background code above all), and
the decoder then has little need of the landmarks. `loss.lambda_recon=0` trains the paper's
loss exactly.

L_inv and L_equiv are both zero for landmarks that ignore the image, so at the start, when
the landmarks do not yet carry anything, they pull them back to the centre, and with both
at full weight from step 0 the landmarks stay where they started (BENCHMARKS.md, "Measured
reasons in the code"). Their weights therefore ramp up linearly over
`loss.consistency_warmup` training forward passes, counted in a buffer so that a resumed run
continues the ramp where it stopped.

The learner also adds the priors every learner shares (`priors.py`): equivariance under
random similarities, which unlike L_equiv needs no flow and so pulls the landmarks onto the
object from the first step, separation and concentration. The warped images serve both
L_transform and L_recon, in the same encoder pass as the pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ulm_dist.config import LossConfig, ModelConfig
from ulm_dist.models.flow import CrossImageFlow, transform_points
from ulm_dist.models.learner import Learner, PairViews
from ulm_dist.models.losses import equivariance_loss, invariance_loss
from ulm_dist.models.networks import PartAutoencoder, Pose
from ulm_dist.models.priors import WarpedDetections


@dataclass
class CycleOutputs:
    """Everything one forward pass of a pair produces; index 0 is image i, 1 is image j."""

    pose: Pose  # of I_i and I_j, concatenated (points: p_i, p_j)
    landmarks_again: tuple[torch.Tensor, torch.Tensor]  # p_i', p_j'
    swapped: tuple[torch.Tensor, torch.Tensor]  # I_ij, I_ji
    recoded: tuple[torch.Tensor, torch.Tensor]  # the one-hop reconstructions of I_i, I_j
    reconstructed: tuple[torch.Tensor, torch.Tensor]  # I_i', I_j'
    flows: tuple[torch.Tensor, torch.Tensor]  # T^{i->j}, T^{j->i}: (B, 2, h, w)
    moved_landmarks: torch.Tensor | None  # landmarks of the moved images, when given

    @property
    def landmarks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """p_i, p_j: (B, K, 2) each."""
        p_i, p_j = self.pose.points.chunk(2)
        return p_i, p_j


class CycleConsistencyModel(PartAutoencoder):
    """The part autoencoder (`encode`, `decode`, `landmarks`) plus the cross-image flow."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.flow_channels)
        self.flow = CrossImageFlow(config.flow_kernel, config.flow_temperature)

    def forward(
        self, image_i: torch.Tensor, image_j: torch.Tensor, moved: torch.Tensor | None = None
    ) -> CycleOutputs:
        """`moved`: optional (2B, 3, S, S) moved copies of I_i and I_j (in that order); the
        one-hop reconstructions then take their appearance codes from them."""
        n = image_i.shape[0]
        # All images go through each network as one batch: same maths, fewer launches.
        inputs = [image_i, image_j] if moved is None else [image_i, image_j, moved]
        pose, appearance = self.encode(torch.cat(inputs))
        pair = Pose(*(None if t is None else t[: 2 * n] for t in pose))
        p_i, p_j = pair.points.split(n)
        a_i, a_j = appearance[: 2 * n].split(n)
        own = appearance[: 2 * n] if moved is None else appearance[2 * n :]
        # One decoder pass for I_ij, I_ji and the one-hop reconstructions of I_i and I_j.
        decoded = self.decode(torch.cat([a_i, a_j, own]), torch.cat([p_j, p_i, p_i, p_j]))
        swapped, recoded = decoded.split(2 * n)
        pose_again, appearance_again = self.encode(swapped)
        p_j_again, p_i_again = pose_again.points.split(n)  # p_j' from I_ij, p_i' from I_ji
        a_i_again, a_j_again = appearance_again.split(n)
        reconstructed = self.decode(
            torch.cat([a_i_again, a_j_again]), torch.cat([p_i_again, p_j_again])
        )
        f_i, f_j = pair.features.split(n)
        return CycleOutputs(
            pose=pair,
            landmarks_again=(p_i_again, p_j_again),
            swapped=tuple(swapped.split(n)),
            recoded=tuple(recoded.split(n)),
            reconstructed=tuple(reconstructed.split(n)),
            flows=self.flow(f_i, f_j),
            moved_landmarks=None if moved is None else pose.points[2 * n :],
        )

    def views(self, image_i: torch.Tensor, image_j: torch.Tensor) -> PairViews:
        """I_i and I_j with their landmarks, the swaps I_ij and I_ji with the landmarks they
        should carry (p_j and p_i), and the cycle's reconstructions I_i', I_j'."""
        out = self(image_i, image_j)
        p_i, p_j = out.landmarks
        return PairViews(
            "cycle",
            [
                ("I_i", image_i, p_i),
                ("I_j", image_j, p_j),
                ("I_ij (p_j)", out.swapped[0], p_j),
                ("I_ji (p_i)", out.swapped[1], p_i),
                ("I_i'", out.reconstructed[0], None),
                ("I_j'", out.reconstructed[1], None),
            ],
        )


class CycleLearner(Learner):
    """`forward(image_i, image_j)` returns {"cycle", "inv", "equiv", "recon", "total"} and the
    priors' scalars."""

    def __init__(self, model_config: ModelConfig, loss_config: LossConfig):
        weights = {
            "cycle": loss_config.lambda_cycle,
            "inv": loss_config.lambda_inv,
            "equiv": loss_config.lambda_equiv,
            "recon": loss_config.lambda_recon,
        }
        super().__init__(CycleConsistencyModel(model_config), loss_config, weights)
        self.consistency_warmup = loss_config.consistency_warmup
        self.transformed_appearance = loss_config.recon_appearance == "transformed"
        self.register_buffer("forward_passes", torch.zeros((), dtype=torch.long))

    def forward(self, image_i: torch.Tensor, image_j: torch.Tensor) -> dict[str, torch.Tensor]:
        images = torch.cat([image_i, image_j])
        warped = None
        if self.transformed_appearance:
            # The warped images also give L_transform its detections, at no extra pass.
            warp, moved = self.warped_views(images)
            out = self.model(image_i, image_j, moved)
            warped = WarpedDetections(warp, out.moved_landmarks)
        else:
            out = self.model(image_i, image_j)
        p_i, p_j = out.landmarks
        i_from_j, j_from_i = out.flows
        carried = (transform_points(i_from_j, p_j), transform_points(j_from_i, p_i))
        # Both images' two reconstructions against the two originals, in one perceptual pass.
        distances = self.perceptual(images, torch.cat([*out.reconstructed, *out.recoded]))
        # P(I, I') is a batch mean per image role: sum the i and j means.
        cycle_i, cycle_j, recon_i, recon_j = (d.mean() for d in distances.chunk(4))
        losses = {
            "cycle": cycle_i + cycle_j,
            "inv": invariance_loss(out.landmarks, out.landmarks_again),
            "equiv": equivariance_loss(out.landmarks, carried),
            "recon": recon_i + recon_j,
            **self.priors(images, out.pose, warped),
        }
        weights = dict(self.weights)
        if self.training:
            self.forward_passes += 1
            # A tensor, not .item(): no host-device sync on the training step.
            ramp = (self.forward_passes / max(1, self.consistency_warmup)).clamp(max=1.0)
            weights["inv"] *= ramp
            weights["equiv"] *= ramp
        return self.with_total(losses, weights)
