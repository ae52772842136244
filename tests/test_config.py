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
    # YAML 1.1 reads an exponent without a dot as a string; a float field takes it.
    assert load_config(None, ["train.lr=2e-3"]).train.lr == 0.002
    assert load_config(None, ["loss.lambda_inv=1E+1"]).loss.lambda_inv == 10.0


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
        (["train.lr=.nan"], r"train.lr: expected a finite number, got nan"),
        (["train.lr=.inf"], r"train.lr: expected a finite number, got inf"),
        (["model.heatmap_std=.nan"], r"model.heatmap_std: expected a finite number, got nan"),
        (["data.hue=-.inf"], r"data.hue: expected a finite number, got -inf"),
        (
            ["train.steps=[1"],
            r"override 'train.steps=\[1': invalid YAML at line 1, column 3: expected ',' or "
            r"'\]', but got '<stream end>' \(while parsing a flow sequence\)",
        ),
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


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "a\\b"])
def test_a_run_name_must_be_one_plain_folder(name):
    with pytest.raises(ConfigError, match=r"train.run_name: expected a plain folder name"):
        load_config(None, [f"train.run_name={name!r}"])


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = write(tmp_path, "model:\n  num_landmarks: 8\n train:\n  steps: 3\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == (
        f"{path}: invalid YAML at line 3, column 2: expected <block end>, but found "
        "'<block mapping start>' (while parsing a block mapping); fix the syntax there"
    )


def test_a_config_file_that_cannot_be_read_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope.yaml'}: no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"{tmp_path}: expected a YAML file, got a folder"):
        load_config(tmp_path)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=f"{binary}: cannot read it as a YAML text file"):
        load_config(binary)


def test_debug_switches_live_in_their_own_section():
    assert load_config().debug.fail_at_step is None
    assert load_config(None, ["debug.fail_at_step=3"]).debug.fail_at_step == 3
    with pytest.raises(ConfigError, match=r"train.fail_at_step: moved to debug.fail_at_step"):
        load_config(None, ["train.fail_at_step=3"])
