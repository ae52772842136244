"""The sweep's figure, read back through matplotlib's objects: one panel per searched
parameter, every trial a point where its value and metric put it, the best one red."""

import matplotlib.colors
import numpy as np
import pytest

from ulm_dist.tune.config import Parameter
from ulm_dist.tune.plot import BEST_COLOUR, TRIAL_COLOUR, plot_metric_against_parameters

PARAMETERS = [
    Parameter("train.lr", "loguniform", (1e-4, 1e-2)),
    Parameter("model.num_landmarks", "values", (10, 30)),
    Parameter("model.norm", "values", ("batch", "group")),
]
POINTS = [
    ({"train.lr": 1e-4, "model.num_landmarks": 10, "model.norm": "group"}, 7.5),
    ({"train.lr": 3e-3, "model.num_landmarks": 30, "model.norm": "batch"}, 6.25),
    ({"train.lr": 1e-2, "model.num_landmarks": 30, "model.norm": "group"}, 9.0),
]


@pytest.mark.parametrize(("mode", "best"), [("min", 1), ("max", 2)])
def test_one_scatter_panel_per_parameter_with_the_best_trial_in_red(mode, best):
    figure = plot_metric_against_parameters(POINTS, PARAMETERS, "val/landmark_error", mode)
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title() for axes in panels] == [
        "val/landmark_error vs train.lr",
        "val/landmark_error vs model.num_landmarks",
        "val/landmark_error vs model.norm",
    ]
    assert len(figure.axes) == 4 and not figure.axes[3].get_visible()  # 2 x 2, one unused
    metric = [value for _, value in POINTS]
    for axes, parameter in zip(panels, PARAMETERS, strict=True):
        (points,) = axes.collections
        xy = points.get_offsets()
        np.testing.assert_allclose(xy[:, 1], metric)
        colours = [matplotlib.colors.to_hex(c) for c in points.get_facecolors()]
        expected = [BEST_COLOUR if n == best else TRIAL_COLOUR for n in range(len(POINTS))]
        assert colours == [matplotlib.colors.to_hex(c) for c in expected]
        assert axes.get_ylabel() == "val/landmark_error"
        assert axes.get_xlabel() == parameter.path
    lr, landmarks, norm = panels
    assert lr.get_xscale() == "log"
    np.testing.assert_allclose(lr.collections[0].get_offsets()[:, 0], [1e-4, 3e-3, 1e-2])
    assert landmarks.get_xscale() == "linear"
    np.testing.assert_allclose(landmarks.collections[0].get_offsets()[:, 0], [10, 30, 30])
    # Listed values that are not numbers: evenly placed, in their listed order, labelled.
    np.testing.assert_allclose(norm.collections[0].get_offsets()[:, 0], [1, 0, 1])
    assert [label.get_text() for label in norm.get_xticklabels()] == ["batch", "group"]


def test_the_figure_saves_as_a_png(tmp_path):
    figure = plot_metric_against_parameters(POINTS[:1], PARAMETERS[:1], "loss/total", "min")
    assert len(figure.axes) == 1
    figure.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
