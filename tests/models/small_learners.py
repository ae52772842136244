"""What the model tests share: small learners of each kind, images with geometry, and a
short optimisation."""

from __future__ import annotations

import torch
from torch import nn

from ulm_dist.config import load_config
from ulm_dist.models import build_learner

# Narrow enough for a test to train a few steps in seconds; consistency_warmup only concerns
# the cycle learner, the appearance and flow widths only the learners that have them. The
# random VGG-16 keeps a perceptual network in the loss (as imagenet would) without weights.
SMALL = [
    "model.channels=[8,16,32]",
    "model.appearance_dim=16",
    "model.flow_channels=16",
    "loss.perceptual=random",
    "loss.perceptual_layers=[pixels,relu1_2]",
    "loss.consistency_warmup=0",
]
# imm and part learn from an image and a warped copy of it.
PAIRS = {"cycle": [], "imm": ["data.pairs=warped"], "part": ["data.pairs=warped"]}


def small_learner(name: str, *overrides: str) -> nn.Module:
    """The `model.name` learner at the SMALL size, seeded: equal overrides, equal weights."""
    torch.manual_seed(0)
    config = load_config(None, [f"model.name={name}", *PAIRS[name], *SMALL, *overrides])
    return build_learner(config.model, config.loss)


def blobs(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images of two coloured Gaussian blobs at random places: simple, but with geometry."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 2, 2, generator=g) * 1.2 - 0.6
    colours = torch.rand(n, 2, 3, generator=g)
    grid = (2 * torch.arange(size) + 1) / size - 1
    d2 = (grid.view(1, 1, 1, size) - centres[..., 0, None, None]) ** 2 + (
        grid.view(1, 1, size, 1) - centres[..., 1, None, None]
    ) ** 2
    masks = torch.exp(-d2 / 0.05)  # (n, 2, size, size)
    return (0.2 + torch.einsum("nbhw,nbc->nchw", masks, colours)).clamp(0, 1)


def loss_history(
    learner: nn.Module, image_i: torch.Tensor, image_j: torch.Tensor, steps: int
) -> list[float]:
    """The total loss at each of `steps` Adam steps (lr 2e-3) on one fixed pair batch."""
    optimiser = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for _ in range(steps):
        losses = learner(image_i, image_j)
        optimiser.zero_grad()
        losses["total"].backward()
        optimiser.step()
        history.append(losses["total"].item())
    return history


def gradient_coverage(learner: nn.Module) -> tuple[list[str], list[str]]:
    """After a backward pass: the trainable parameters' names, and those of them that got
    no (or an all-zero) gradient."""
    trainable = {n: p for n, p in learner.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    return list(trainable), no_grad
