"""A sweep's metric against each searched parameter: one scatter panel per parameter.

Drawn with matplotlib's object API on its Agg canvas (no pyplot, no display). Numeric
parameters are placed by value, on a log axis for log-uniform ranges; other listed values
(strings, lists, booleans) are placed evenly, in their listed order. Every trial is a point;
the best one is red.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ulm_dist.tune.config import Parameter

COLUMNS = 2
PANEL_SIZE = (4.5, 3.2)  # inches, each panel
DPI = 100
TRIAL_COLOUR = "tab:blue"
BEST_COLOUR = "tab:red"


def plot_metric_against_parameters(
    points: Sequence[tuple[dict[str, Any], float]],
    parameters: Sequence[Parameter],
    metric: str,
    mode: str,
) -> Figure:
    """`points` pairs each trial's searched values with its metric value; `mode` (min or max)
    says which is best. One panel per parameter, titled `<metric> vs <path>`."""
    columns = min(COLUMNS, len(parameters))
    rows = math.ceil(len(parameters) / columns)
    figure = Figure(
        figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=DPI, layout="constrained"
    )
    FigureCanvasAgg(figure)
    panels = figure.subplots(rows, columns, squeeze=False).flatten()
    values = [value for _, value in points]
    best = (min if mode == "min" else max)(range(len(points)), key=values.__getitem__)
    colours = [BEST_COLOUR if n == best else TRIAL_COLOUR for n in range(len(points))]
    for panel, parameter in zip(panels, parameters, strict=False):
        xs = [params.get(parameter.path) for params, _ in points]
        if all(is_number(x) for x in xs):
            panel.scatter(xs, values, c=colours)
            if parameter.kind == "loguniform" and all(x > 0 for x in xs):
                panel.set_xscale("log")
        else:
            labels = [str(v) for v in parameter.values if str(v) in set(map(str, xs))]
            labels += [x for x in dict.fromkeys(map(str, xs)) if x not in labels]
            panel.scatter([labels.index(str(x)) for x in xs], values, c=colours)
            panel.set_xticks(range(len(labels)), labels)
            panel.set_xlim(-0.5, len(labels) - 0.5)
        panel.set(title=f"{metric} vs {parameter.path}", xlabel=parameter.path, ylabel=metric)
        panel.grid(alpha=0.3)
    for unused in panels[len(parameters) :]:
        unused.set_visible(False)
    return figure


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
