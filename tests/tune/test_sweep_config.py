"""The sweep config: jobs/sweep.yaml loads, and bad fields are refused by their dotted names."""

from pathlib import Path

import pytest

from ulm_dist.config import ConfigError
from ulm_dist.tune.config import load_sweep_config, sweep_config_from_dict
from ulm_dist.tune.plot import plot_metric_against_parameters
from ulm_dist.tune.sweep import main

REPO = Path(__file__).resolve().parents[2]


def sweep(**fields):
    raw = {"metric": "loss/total", "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}
    return sweep_config_from_dict({**raw, **fields})


def test_the_job_file_loads_and_says_what_it_is_for():
    path = REPO / "jobs" / "sweep.yaml"
    assert path.read_text().startswith("# sweep: "), "start with a comment on its purpose"
    config = load_sweep_config(path)
    assert config.metric == "val/landmark_error"
    assert "model.num_landmarks" in config.space
    base = config.base_config()
    trial = config.trial_config({"model.num_landmarks": 15, "train.lr": 0.002}, [])
    assert (trial.model.num_landmarks, trial.train.lr) == (15, 0.002)
    assert trial.train.steps == base.train.steps


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"space": {"model.num_landmarkz": {"values": [4, 8]}}}, "model.num_landmarkz"),
        ({"space": {"model.num_landmarks": {"values": [0, 8]}}}, "space.model.num_landmarks"),
        ({"space": {"train.lr": {"loguniform": [0, 1e-3]}}}, "space.train.lr.loguniform"),
        ({"space": {"train.lr": {"uniform": [1e-3, 1e-4]}}}, "space.train.lr.uniform"),
        ({"space": {"train.lr": {"between": [1, 2]}}}, "space.train.lr"),
        ({"space": {"train.run_name": {"values": ["a"]}}}, "space.train.run_name"),
        ({"space": {}}, "space"),
        ({"search": {"algorithm": "grid"}}, "space.train.lr"),
        ({"search": {"algorithm": "bayes"}}, "search.algorithm"),
        ({"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor"),
        ({"scheduler": {"grace_period": 10_000}}, "scheduler.grace_period"),
        ({"overrides": ["train.storage=elsewhere"]}, "overrides"),
        ({"overrides": ["train.stepz=3"]}, "train.stepz"),
        ({"metric": "val/landmark_error", "overrides": ["data.val=null"]}, "metric"),
        ({"name": "a/b"}, "name"),
        ({"name": ".."}, "name"),
        ({"nmae": "typo"}, "nmae"),
    ],
)
def test_bad_fields_are_named(fields, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        sweep(**fields)


def test_a_sweep_file_that_cannot_be_read_exits_2_naming_it(tmp_path, capsys):
    broken = tmp_path / "sweep.yaml"
    broken.write_text("metric: loss/total\nspace: {train.lr: [1\n")
    assert main(["--config", str(broken)]) == 2
    assert f"ulm_dist.tune: error: {broken}: invalid YAML at line 3, column 1" in (
        capsys.readouterr().err
    )
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert f"{tmp_path / 'missing.yaml'}: no such file" in capsys.readouterr().err


def test_plot_has_one_panel_per_parameter():
    config = sweep(
        space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.num_landmarks": {"values": [4, 8]}}
    )
    points = [({"train.lr": 1e-3, "model.num_landmarks": 4}, 0.5)]
    points.append(({"train.lr": 3e-3, "model.num_landmarks": 8}, 0.25))
    figure = plot_metric_against_parameters(points, list(config.space.values()), "loss", "min")
    # Side by side, in the order of the sweep file (tests/tune/test_plot.py reads the points).
    assert [axes.get_title() for axes in figure.axes] == [
        "loss vs train.lr",
        "loss vs model.num_landmarks",
    ]
    assert [axes.get_subplotspec().colspan.start for axes in figure.axes] == [0, 1]
