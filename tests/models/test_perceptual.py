"""The perceptual comparison: the VGG-16 itself, the three `loss.perceptual` choices, and
where `imagenet` gets its weights (hub cache, download, the fetch command), offline: the
"download" is a fabricated VGG-16 state dict served through a file:// URL."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ulm_dist.config import ConfigError, load_config
from ulm_dist.models import build_learner, perceptual
from ulm_dist.models.losses import perceptual_distances
from ulm_dist.models.perceptual import (
    FETCH_COMMAND,
    VGG16_SHA256_PREFIX,
    VGG16_URL,
    PerceptualWeightsError,
    VGG16Features,
    compares_pixels,
    hub_weights_folder,
    perceptual_network,
)

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["relu1_2", "relu2_2"]


def torchvision_style_state_dict(layers: list[str]) -> dict[str, torch.Tensor]:
    """What torchvision's vgg16().state_dict() holds for these layers (real VGG-16 shapes up
    to the deepest one), plus a classifier key."""
    torch.manual_seed(1)
    source = VGG16Features(layers)
    state = {f"features.{k}": torch.randn_like(v) for k, v in source.features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    return state


def published_weights(folder: Path) -> tuple[Path, str, dict[str, torch.Tensor]]:
    """A VGG-16 state dict saved as torchvision names its files, vgg16-<SHA-256 prefix>.pth:
    the file, its file:// URL and the state dict."""
    state = torchvision_style_state_dict(LAYERS)
    folder.mkdir(parents=True, exist_ok=True)
    unnamed = folder / "vgg16.pth"
    torch.save(state, unnamed)
    digest = hashlib.sha256(unnamed.read_bytes()).hexdigest()
    named = unnamed.rename(folder / f"vgg16-{digest[:8]}.pth")
    return named, named.as_uri(), state


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME for the test (the hub cache is $TORCH_HOME/hub/checkpoints)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert hub_weights_folder() == home / "hub" / "checkpoints"
    return home


def loss_config(*overrides: str):
    return load_config(None, list(overrides)).loss


def imagenet_config(*overrides: str):
    return loss_config(
        "loss.perceptual=imagenet", "loss.perceptual_layers=[pixels,relu1_2,relu2_2]", *overrides
    )


# --- the VGG-16 ----------------------------------------------------------------------------


def test_loads_torchvision_weights_from_a_local_file(tmp_path):
    state = torchvision_style_state_dict(LAYERS)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    vgg = VGG16Features(LAYERS, weights=path)
    assert torch.equal(vgg.features[0].weight, state["features.0.weight"])
    assert torch.equal(vgg.features[7].bias, state["features.7.bias"])  # conv2_2 is index 7
    assert not any(p.requires_grad for p in vgg.parameters())


def test_a_file_that_is_not_vgg_is_refused_with_its_name(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"other\.pth: not a torchvision VGG-16 state dict"):
        VGG16Features(["relu1_2"], weights=path)


def test_random_features_are_deterministic():
    first, second = VGG16Features(["relu3_3"]), VGG16Features(["relu3_3"])
    images = torch.rand(2, 3, 32, 32)
    taps = first(images)
    assert list(taps) == ["relu3_3"] and taps["relu3_3"].shape == (2, 256, 8, 8)
    assert torch.equal(taps["relu3_3"], second(images)["relu3_3"])


def test_perceptual_distance_is_zero_for_equal_images_and_grows_with_the_difference():
    vgg = VGG16Features(LAYERS)
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


def test_the_edge_term_is_the_mean_gradient_difference_and_ignores_flat_colour():
    rows = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 3, 6, 6)
    ramp = 0.1 * rows  # vertical steps of 0.1, none horizontally
    flat = torch.zeros_like(ramp)
    pixels = perceptual_distances(flat, ramp, None, compare_pixels=True)
    both = perceptual_distances(flat, ramp, None, compare_pixels=True, edge_weight=2.0)
    # Vertical differences off by 0.1 everywhere, horizontal ones by 0: 2 * (0.1 + 0).
    assert torch.allclose(both - pixels, torch.tensor([0.2]))
    # A flat colour shift moves every pixel but no edge.
    shifted = perceptual_distances(ramp, ramp + 0.3, None, compare_pixels=False, edge_weight=1.0)
    assert torch.allclose(shifted, torch.zeros(1), atol=1e-6)
    # An edge one column out of place: in each of the 8 rows two of the 7 horizontal
    # differences are off by 1 (where the edge is and where it should be), none vertically.
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0
    moved = torch.zeros_like(step)
    moved[..., 5:] = 1.0
    edges = perceptual_distances(step, moved, None, compare_pixels=False, edge_weight=1.0)
    assert torch.allclose(edges, torch.tensor([2 / 7]))
    # And it costs in proportion to the edge's contrast.
    assert torch.allclose(
        perceptual_distances(0.5 * step, 0.5 * moved, None, False, edge_weight=1.0), 0.5 * edges
    )


def test_lambda_edges_reaches_the_learners_reconstruction_loss():
    cfg = load_config(None, ["loss.lambda_edges=3"])
    with_edges = build_learner(cfg.model, cfg.loss)
    plain = build_learner(cfg.model, load_config(None, []).loss)
    target, output = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    output[..., 4:] = 0.5
    edges = perceptual_distances(target, output, None, compare_pixels=False, edge_weight=1.0)
    added = with_edges.perceptual(target, output) - plain.perceptual(target, output)
    assert edges.item() > 0 and torch.allclose(added, 3 * edges)


# --- the three choices ---------------------------------------------------------------------


def test_pixels_is_the_default_and_builds_no_network(torch_home):
    config = loss_config()
    assert config.perceptual == "pixels"
    assert perceptual_network(config, url="file:///nowhere/vgg16-00000000.pth") is None
    assert compares_pixels(config)
    # The VGG layers are ignored, "pixels" among them or not: pixels is the whole comparison.
    assert compares_pixels(loss_config("loss.perceptual_layers=[relu1_2]"))
    assert not torch_home.exists()  # nothing looked up, nothing downloaded


def test_random_builds_frozen_fixed_seed_features_without_weights(torch_home):
    config = loss_config("loss.perceptual=random", "loss.perceptual_layers=[relu1_2]")
    vgg = perceptual_network(config, url="file:///nowhere/vgg16-00000000.pth")
    assert vgg.layers == ["relu1_2"] and not compares_pixels(config)
    assert torch.equal(vgg.features[0].weight, VGG16Features(["relu1_2"]).features[0].weight)
    assert not any(p.requires_grad for p in vgg.parameters())
    assert not torch_home.exists()


@pytest.mark.parametrize("choice", ["imagenet", "random"])
def test_vgg_choices_without_a_vgg_layer_are_refused_naming_the_layers(choice):
    with pytest.raises(ConfigError, match=r"loss\.perceptual_layers: loss\.perceptual=" + choice):
        loss_config(f"loss.perceptual={choice}", "loss.perceptual_layers=[pixels]")


def test_pixels_with_layers_pixels_only_is_accepted():
    assert loss_config("loss.perceptual_layers=[pixels]").perceptual == "pixels"


@pytest.mark.parametrize("choice", ["pixels", "random"])
def test_weights_for_a_choice_that_does_not_use_them_are_refused(choice, tmp_path):
    weights = tmp_path / "vgg16.pth"
    weights.touch()
    with pytest.raises(
        ConfigError, match=r"loss\.vgg_weights: used only with loss\.perceptual=imagenet"
    ):
        loss_config(f"loss.perceptual={choice}", f"loss.vgg_weights={weights}")


# --- where imagenet gets its weights --------------------------------------------------------


def test_the_url_names_the_published_hash_prefix():
    assert VGG16_URL.rsplit("/", 1)[-1] == f"vgg16-{VGG16_SHA256_PREFIX}.pth"
    assert perceptual.sha256_prefix_in_name(VGG16_URL) == VGG16_SHA256_PREFIX


def test_first_use_downloads_into_the_hub_cache_then_the_cache_is_used(tmp_path, torch_home):
    served, url, state = published_weights(tmp_path / "server")
    vgg = perceptual_network(imagenet_config(), url=url)
    cached = torch_home / "hub" / "checkpoints" / served.name
    assert cached.read_bytes() == served.read_bytes()
    assert torch.equal(vgg.features[7].bias, state["features.7.bias"])
    assert not any(p.requires_grad for p in vgg.parameters())
    # Second use: the server is gone, the cached file serves.
    served.unlink()
    again = perceptual_network(imagenet_config(), url=url)
    assert torch.equal(again.features[0].weight, state["features.0.weight"])


def test_vgg_weights_path_is_used_instead_of_the_cache(tmp_path, torch_home):
    state = torchvision_style_state_dict(LAYERS)
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    vgg = perceptual_network(
        imagenet_config(f"loss.vgg_weights={path}"), url="file:///nowhere/vgg16-00000000.pth"
    )
    assert torch.equal(vgg.features[0].weight, state["features.0.weight"])
    assert not torch_home.exists()


def test_a_truncated_cached_file_is_refused_saying_to_delete_it(tmp_path, torch_home):
    served, url, _ = published_weights(tmp_path / "server")
    cached = hub_weights_folder() / served.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(served.read_bytes()[:1000])
    with pytest.raises(PerceptualWeightsError, match=r"truncated or corrupt; delete it") as error:
        perceptual_network(imagenet_config(), url=url)
    assert str(cached) in str(error.value)


def test_a_download_that_does_not_match_its_name_is_refused_and_not_kept(tmp_path, torch_home):
    served, _, _ = published_weights(tmp_path / "server")
    impostor = served.rename(served.with_name("vgg16-00000000.pth"))
    with pytest.raises(PerceptualWeightsError, match=r"not the expected file"):
        perceptual_network(imagenet_config(), url=impostor.as_uri())
    assert list(hub_weights_folder().iterdir()) == []  # no partial or wrong file left


def test_without_cache_or_network_the_error_says_what_to_do(tmp_path, torch_home):
    url = (tmp_path / "offline" / "vgg16-397923af.pth").as_uri()
    with pytest.raises(PerceptualWeightsError) as error:
        perceptual_network(imagenet_config(), url=url)
    message = str(error.value)
    for needed in (
        str(hub_weights_folder() / "vgg16-397923af.pth"),  # where it looked
        url,
        f"{FETCH_COMMAND} --dir DIR",
        "TORCH_HOME",
        "loss.vgg_weights=",
        "loss.perceptual=pixels",
    ):
        assert needed in message, f"{needed!r} missing from: {message}"


def test_fetch_command_prefetches_into_a_folder_and_says_how_to_use_it(tmp_path, torch_home):
    served, url, _ = published_weights(tmp_path / "server")
    folder = tmp_path / "for the cluster"
    command = [sys.executable, "-m", "ulm_dist.fetch_weights", "--dir", str(folder), "--url", url]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    fetched = folder / served.name
    assert fetched.read_bytes() == served.read_bytes()
    assert str(fetched) in result.stdout and "loss.vgg_weights=" in result.stdout
    # The file it wrote is what training takes.
    assert perceptual_network(imagenet_config(f"loss.vgg_weights={fetched}")) is not None
    # Run again without the source: the file is kept, checked, not fetched again.
    served.unlink()
    again = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_fetch_command_fails_with_the_explanation_when_offline(tmp_path, torch_home):
    url = (tmp_path / "offline" / "vgg16-397923af.pth").as_uri()
    command = [sys.executable, "-m", "ulm_dist.fetch_weights", "--url", url]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert result.returncode == 2
    assert "loss.perceptual=pixels" in result.stderr
    assert str(hub_weights_folder()) in result.stderr  # the subprocess saw the same TORCH_HOME
