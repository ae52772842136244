import logging

import pytest
import torch

from ulm_dist.losses import perceptual_distances
from ulm_dist.models import perceptual
from ulm_dist.models.perceptual import VGG16Features


def torchvision_style_state_dict(layers: list[str]) -> dict[str, torch.Tensor]:
    """What torchvision's vgg16().state_dict() holds for these layers, plus classifier keys."""
    torch.manual_seed(1)
    source = VGG16Features(layers)
    state = {f"features.{k}": torch.randn_like(v) for k, v in source.features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4096, 25088)
    return state


def test_loads_torchvision_weights_from_a_local_file(tmp_path):
    layers = ["relu1_2", "relu2_2"]
    state = torchvision_style_state_dict(layers)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    vgg = VGG16Features(layers, weights=path)
    assert torch.equal(vgg.features[0].weight, state["features.0.weight"])
    assert torch.equal(vgg.features[7].bias, state["features.7.bias"])  # conv2_2 is index 7
    assert not any(p.requires_grad for p in vgg.parameters())


def test_a_file_that_is_not_vgg_is_refused_with_its_name(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"other\.pth: not a torchvision VGG-16 state dict"):
        VGG16Features(["relu1_2"], weights=path)


def test_without_weights_it_warns_once_and_is_deterministic(caplog, monkeypatch):
    monkeypatch.setattr(perceptual, "_warned_random", False)
    with caplog.at_level(logging.WARNING, logger="ulm_dist.models.perceptual"):
        first, second = VGG16Features(["relu3_3"]), VGG16Features(["relu3_3"])
    assert sum("No VGG-16 weights" in r.message for r in caplog.records) == 1
    images = torch.rand(2, 3, 32, 32)
    taps = first(images)
    assert list(taps) == ["relu3_3"] and taps["relu3_3"].shape == (2, 256, 8, 8)
    assert torch.equal(taps["relu3_3"], second(images)["relu3_3"])


def test_perceptual_distance_is_zero_for_equal_images_and_grows_with_the_difference():
    vgg = VGG16Features(["relu1_2", "relu2_2"])
    image = torch.rand(2, 3, 32, 32)
    noise = torch.randn_like(image)
    outputs = torch.cat([(image + s * noise).clamp(0, 1) for s in (0.0, 0.05, 0.2)])
    distances = perceptual_distances(image, outputs, vgg, compare_pixels=True).view(3, 2)
    assert torch.equal(distances[0], torch.zeros(2))
    assert (distances[1] > 0).all() and (distances[2] > distances[1]).all()
    # Stacked outputs give the same numbers as one call per output.
    alone = perceptual_distances(image, outputs[4:], vgg, compare_pixels=True)
    assert torch.allclose(alone, distances[2], rtol=1e-5)


def test_pixels_only_is_the_mean_absolute_difference():
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.25)
    assert perceptual_distances(a, b, None, compare_pixels=True).item() == 0.25
