"""A PNG of a sweep's metric against each searched parameter, one scatter panel each.

Drawn with Pillow (already a dependency) rather than matplotlib, which the project does not
otherwise need. Numeric parameters are placed by value (on a log axis for log-uniform ranges);
other listed values are placed evenly in their listed order. The best trial is drawn in red.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ulm_dist.tune.config import Parameter

PANEL = (360, 260)  # width, height of one panel in pixels
PLOT_BOX = (64, 30, 344, 220)  # left, top, right, bottom of the axes inside a panel
COLUMNS = 2
POINT_RADIUS = 4


def plot_metric_against_parameters(
    points: Sequence[tuple[dict[str, Any], float]],
    parameters: Sequence[Parameter],
    metric: str,
    mode: str,
) -> Image.Image:
    """`points` pairs each trial's searched values with its metric value."""
    rows = math.ceil(len(parameters) / COLUMNS)
    image = Image.new("RGB", (PANEL[0] * min(COLUMNS, len(parameters)), PANEL[1] * rows), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    values = [value for _, value in points]
    best = (min if mode == "min" else max)(range(len(points)), key=values.__getitem__)
    y_axis = _Axis(values, log=False)
    for index, parameter in enumerate(parameters):
        left = PANEL[0] * (index % COLUMNS)
        top = PANEL[1] * (index // COLUMNS)
        box = (left + PLOT_BOX[0], top + PLOT_BOX[1], left + PLOT_BOX[2], top + PLOT_BOX[3])
        draw.rectangle(box, outline="black")
        draw.text((left + PLOT_BOX[0], top + 8), f"{metric} vs {parameter.path}", "black", font)
        xs = [params.get(parameter.path) for params, _ in points]
        x_axis = _Axis(xs, log=parameter.kind == "loguniform")
        for label, fraction in x_axis.ticks():
            x = box[0] + fraction * (box[2] - box[0])
            draw.line((x, box[3], x, box[3] + 4), "black")
            draw.text((x, box[3] + 8), label, "black", font, anchor="ma")
        for label, fraction in y_axis.ticks():
            y = box[3] - fraction * (box[3] - box[1])
            draw.line((box[0] - 4, y, box[0], y), "black")
            draw.text((box[0] - 6, y), label, "black", font, anchor="rm")
        for number, (x_value, y_value) in enumerate(zip(xs, values, strict=True)):
            x = box[0] + x_axis.fraction(x_value) * (box[2] - box[0])
            y = box[3] - y_axis.fraction(y_value) * (box[3] - box[1])
            colour = "red" if number == best else "steelblue"
            draw.ellipse(
                (x - POINT_RADIUS, y - POINT_RADIUS, x + POINT_RADIUS, y + POINT_RADIUS), colour
            )
    return image


class _Axis:
    """Maps values to [0.05, 0.95] of an axis: by value if all are numbers, else by rank."""

    MARGIN = 0.05

    def __init__(self, values: Sequence[Any], log: bool):
        self.numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        self.log = log and self.numeric and all(v > 0 for v in values)
        if self.numeric:
            scaled = [self._scale(v) for v in values]
            self.low, self.high = min(scaled), max(scaled)
        else:
            self.categories = list(dict.fromkeys(map(str, values)))

    def _scale(self, value: float) -> float:
        return math.log10(value) if self.log else float(value)

    def fraction(self, value: Any) -> float:
        if self.numeric:
            span = self.high - self.low
            # A single distinct value sits in the middle.
            where = (self._scale(value) - self.low) / span if span else 0.5
        else:
            count = len(self.categories)
            where = self.categories.index(str(value)) / (count - 1) if count > 1 else 0.5
        return self.MARGIN + (1 - 2 * self.MARGIN) * where

    def ticks(self) -> list[tuple[str, float]]:
        if not self.numeric:
            return [(label, self.fraction(label)) for label in self.categories]
        ends = [self.low, self.high] if self.high > self.low else [self.low]
        values = [10**end if self.log else end for end in ends]
        return [(f"{value:.3g}", self.fraction(value)) for value in values]
