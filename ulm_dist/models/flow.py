"""Cross-image flow module of Xu et al. 2020 (Sec. 3.3): where does each pixel of one image
land in the other?

    C[b, yi, xi, yj, xj] = cos(f_i[:, yi, xi], f_j[:, yj, xj])       4D correlation
    C^ = W_1 * (W_2 * C)                                              factorised 4D conv
    S^{i->j}(yj, xj) = softmax over (yi, xi) of C^[:, :, yj, xj]
    T^{i->j}(yj, xj) = expected (x, y) of image i under S^{i->j}(yj, xj)

T^{i->j} maps positions of image j into image i, so T^{i->j} o p_j is comparable with p_i.

Differs from the paper: it takes the argmax of S, which has no gradient and snaps to the
feature grid. We take the expectation (a soft-argmax at a configurable temperature), which
is differentiable, so L_equiv trains both the landmarks and the matching features, and is
sub-pixel. As the temperature goes to zero the two coincide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ulm_dist.models.landmarks import pixel_centres


def cosine_correlation(features_i: torch.Tensor, features_j: torch.Tensor) -> torch.Tensor:
    """(B, C, Hi, Wi), (B, C, Hj, Wj) -> (B, Hi, Wi, Hj, Wj) cosine similarities."""
    f_i = F.normalize(features_i.float(), dim=1)
    f_j = F.normalize(features_j.float(), dim=1)
    return torch.einsum("bcyx,bcvu->byxvu", f_i, f_j)


def expected_source_positions(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-argmax over the source (i) positions for every target (j) position.

    scores: (B, Hi, Wi, Hj, Wj). Returns T: (B, 2, Hj, Wj), the expected normalised (x, y)
    in image i, laid out as an image over j so that it can be sampled like one.
    """
    b, hi, wi, hj, wj = scores.shape
    prob = F.softmax(scores.reshape(b, hi * wi, hj, wj) / temperature, dim=1)
    prob = prob.reshape(b, hi, wi, hj, wj)
    xs = pixel_centres(wi, device=scores.device, dtype=prob.dtype)
    ys = pixel_centres(hi, device=scores.device, dtype=prob.dtype)
    x = torch.einsum("byxvu,x->bvu", prob, xs)
    y = torch.einsum("byxvu,y->bvu", prob, ys)
    return torch.stack([x, y], dim=1)


def transform_points(flow: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """T o p: read the flow field T (B, 2, H, W) at points (B, K, 2), bilinearly."""
    sampled = F.grid_sample(
        flow,
        points.unsqueeze(2).to(flow.dtype),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return sampled.squeeze(-1).transpose(1, 2)


class FactorisedConv4d(nn.Module):
    """A k x k x k x k convolution of the 4D correlation as two k x k 2D convolutions, one over
    the source positions and one over the target positions (Xu et al.'s W_1 and W_2).

    Both kernels start as a centred delta, so the untrained module is the identity and the
    flow is plain feature matching until training refines it.
    """

    def __init__(self, kernel_size: int):
        super().__init__()
        # No biases: a constant added to all scores cannot change a softmax over them.
        self.over_source = nn.Conv2d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.over_target = nn.Conv2d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        for conv in (self.over_source, self.over_target):
            nn.init.zeros_(conv.weight)
            with torch.no_grad():
                conv.weight[0, 0, kernel_size // 2, kernel_size // 2] = 1.0

    def forward(self, corr: torch.Tensor) -> torch.Tensor:
        b, hi, wi, hj, wj = corr.shape
        x = corr.permute(0, 3, 4, 1, 2).reshape(b * hj * wj, 1, hi, wi)
        x = self.over_source(x.to(self.over_source.weight.dtype))
        x = x.reshape(b, hj, wj, hi, wi).permute(0, 3, 4, 1, 2).reshape(b * hi * wi, 1, hj, wj)
        x = self.over_target(x)
        return x.reshape(b, hi, wi, hj, wj)


class CrossImageFlow(nn.Module):
    """T^{i->j} and T^{j->i} from the two images' matching features."""

    def __init__(self, kernel_size: int, temperature: float):
        super().__init__()
        self.conv4d = FactorisedConv4d(kernel_size)
        self.temperature = temperature

    def forward(
        self, features_i: torch.Tensor, features_j: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (T^{i->j}, T^{j->i}), each (B, 2, H, W) over its target image."""
        scores = self.conv4d(cosine_correlation(features_i, features_j))
        i_from_j = expected_source_positions(scores, self.temperature)
        j_from_i = expected_source_positions(scores.permute(0, 3, 4, 1, 2), self.temperature)
        return i_from_j, j_from_i
