"""A run's training curves: its losses and validation error against step, one figure.

    figure = training_curves(records)          # records as in metrics.jsonl
    write_training_curves(log_folder)          # <log_folder>/training_curves.png

The driver writes it next to metrics.jsonl at the end of a run; `python -m ulm_dist.evaluate`
writes one into its results folder, with the evaluated step marked. Drawn with matplotlib's
object API on its Agg canvas: no pyplot, no display, no global backend switched.

Panels: `losses` (every `loss/` term, the total in black, on a log axis: the terms span
decades), and, if the run evaluated on data.val, `validation error` (`val/landmark_error`
and the mean-shape baseline it should beat, % of the normaliser).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ulm_dist.config import TrainConfig
from ulm_dist.evaluate.regression import MEAN_SHAPE_ERROR, VAL_LANDMARK_ERROR, VAL_PREFIX
from ulm_dist.train.metrics_log import METRICS_NAME, read_metrics

CURVES_NAME = "training_curves.png"
LOSS_PREFIX = "loss/"
TOTAL_LOSS = "loss/total"
VAL_CURVES = (VAL_LANDMARK_ERROR, VAL_PREFIX + MEAN_SHAPE_ERROR)
LOSSES_TITLE = "losses"
VAL_TITLE = "validation error"
PANEL_SIZE = (5.5, 3.6)  # inches, each panel
DPI = 100


def training_curves(
    records: Sequence[dict[str, Any]], run_name: str = "", mark_step: int | None = None
) -> Figure:
    """The figure of `records` (one dict per report, with `step`); `mark_step` draws a
    dashed line at that step on every panel (the checkpoint evaluated)."""
    losses = sorted({name for record in records for name in record if name.startswith(LOSS_PREFIX)})
    validated = [name for name in VAL_CURVES if any(name in record for record in records)]
    panels = 1 + bool(validated)
    figure = Figure(figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for name in losses:
        total = name == TOTAL_LOSS
        steps, values = series(records, name)
        axes[0].plot(
            steps,
            values,
            label=name.removeprefix(LOSS_PREFIX),
            color="black" if total else None,
            linewidth=2 if total else 1,
            marker="." if len(steps) < 30 else None,
        )
    axes[0].set(title=LOSSES_TITLE, xlabel="step", ylabel="loss")
    if all(value > 0 for record in records for name, value in record.items() if name in losses):
        axes[0].set_yscale("log")
    if validated:
        for name in validated:
            steps, values = series(records, name)
            baseline = name != VAL_LANDMARK_ERROR
            axes[1].plot(steps, values, label=name, marker="o", linestyle="--" if baseline else "-")
        axes[1].set(title=VAL_TITLE, xlabel="step", ylabel="% of the normaliser")
    for panel in axes:
        if mark_step is not None:
            panel.axvline(mark_step, color="grey", linestyle=":", label=f"step {mark_step}")
        if panel.lines:
            panel.legend(fontsize="small")
        panel.grid(alpha=0.3)
    if run_name:
        figure.suptitle(run_name)
    return figure


def series(records: Sequence[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """The steps that reported `name`, and its values there."""
    kept = [record for record in records if isinstance(record.get(name), (int, float))]
    return [record["step"] for record in kept], [float(record[name]) for record in kept]


def write_run_curves(train: TrainConfig, out: Path, mark_step: int | None = None) -> Path | None:
    """The figure of the run `train` configures, from its metrics.jsonl in train.log_dir on
    this machine (as the driver resolved it, from the working folder), at `out`."""
    log_folder = Path(train.log_dir).expanduser().resolve() / train.run_name
    return write_training_curves(log_folder, out, mark_step)


def write_training_curves(
    log_folder: Path, out: Path | None = None, mark_step: int | None = None
) -> Path | None:
    """The figure of `<log_folder>/metrics.jsonl`, as a PNG at `out` (default: beside it);
    None when the run has no records there."""
    records = read_metrics(log_folder / METRICS_NAME)
    if not records:
        return None
    out = out or log_folder / CURVES_NAME
    training_curves(records, log_folder.name, mark_step).savefig(out)
    return out
