import pytest

from ulm_dist.config import ConfigError, load_config


def write(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_tiny_preset():
    config = load_config()
    assert config.model.preset == "tiny" and config.model.image_size == 32
    assert config.model.num_landmarks == 10


def test_paper_preset_fills_in_sizes_and_explicit_fields_win(tmp_path):
    config = load_config(write(tmp_path, "model:\n  preset: paper\n  num_landmarks: 30\n"))
    assert config.model.image_size == 128 and config.model.channels == [32, 64, 128, 256]
    assert config.model.num_landmarks == 30
    overridden = load_config(write(tmp_path, "model: {preset: paper}"), ["model.image_size=64"])
    assert overridden.model.image_size == 64


def test_overrides_parse_yaml_values():
    config = load_config(None, ["loss.lambda_inv=0.5", "model.channels=[8, 16]", "train.steps=7"])
    assert config.loss.lambda_inv == 0.5 and config.model.channels == [8, 16]
    assert config.train.steps == 7
    assert isinstance(load_config(None, ["loss.lambda_inv=2"]).loss.lambda_inv, float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_landmarks=0"], r"model.num_landmarks: must be >= 1, got 0"),
        (["model.num_landmark=5"], r"unknown config key model.num_landmark"),
        (["modle.num_landmarks=5"], r"unknown config key modle"),
        (["model.preset=huge"], r"model.preset: expected one of \['paper', 'tiny'\]"),
        (["model.name=gan"], r"model.name: expected one of \['cycle', 'imm', 'part'\], got 'gan'"),
        (["model.heatmap_std=wide"], r"model.heatmap_std: expected float, got 'wide'"),
        (["model.image_size=30"], r"model.image_size: 30 is not divisible by 4"),
        (["model.flow_kernel=4"], r"model.flow_kernel: expected an odd size"),
        (["model.channels=[16, -1]"], r"model.channels: must be >= 1, got -1"),
        (["loss.perceptual_layers=[relu9_9]"], r"loss.perceptual_layers: unknown layers"),
        (["loss.vgg_weights=/nope/vgg.pth"], r"loss.vgg_weights: no such file: /nope/vgg.pth"),
        (["loss.lambda_cycle=-1"], r"loss.lambda_cycle: must be >= 0"),
        (["train.steps=true"], r"train.steps: expected an integer, got True"),
        (["steps"], r"override 'steps': expected section.key=value"),
    ],
)
def test_bad_values_name_their_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(write(tmp_path, "model: 3\n"))
