"""A finished sweep's results: one row per trial, the best trial, and what gets written.

Trials are ranked by the best value of the sweep's metric each reached: with ASHA, trials stop
at different steps, and a run's best checkpoint (what `deploy/export.py` picks) is not
always its last.
The table (`trials.parquet`) and the plot go into the sweep's folder, local or S3.

A failed trial's error is kept as Tune gives it, tracebacks included, with URL credentials
redacted (`redaction.py`): the table and the summary are shared, uploaded to MLflow and printed,
and an error from an S3 client may quote an endpoint given as `http://KEY:SECRET@host`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import ResultGrid

from ulm_dist.config import Config
from ulm_dist.redaction import redact_url, redacted
from ulm_dist.storage import StorageFolder, s3_options
from ulm_dist.train.checkpoint import CheckpointStore
from ulm_dist.train.metrics_log import TENSORBOARD_NAME
from ulm_dist.tune.config import SweepConfig
from ulm_dist.tune.plot import plot_metric_against_parameters

TABLE_NAME = "trials.parquet"
# Besides the sweep's metric, the table keeps each trial's last value of these.
FINAL_PREFIXES = ("loss/", "val/")


@dataclass
class TrialResult:
    name: str  # trial_<id>: Tune's trial folder and the trial's training run are both so named
    status: str  # finished, stopped early (by the scheduler), failed, or no metric reported
    params: dict[str, Any]  # the searched values, by training config path
    step: int | None  # the last step reported to Tune
    best: float | None  # the best value of the sweep's metric over the trial
    final: dict[str, float]  # the last reported value of the metric and the losses
    run: str  # the training run's folder (URI)
    checkpoint: str | None  # its latest complete checkpoint (URI)
    tensorboard: Path
    error: str | None = None  # why it failed, URL credentials redacted


@dataclass
class SweepResults:
    sweep: SweepConfig
    trials: list[TrialResult]
    log_folder: Path
    written: dict[str, str] = field(default_factory=dict)  # what was written: table, plot
    files: dict[str, bytes] = field(default_factory=dict)  # and their contents, by file name
    exported: Path | None = None

    def ranked(self) -> list[TrialResult]:
        """Trials with a metric, best first."""
        scored = [trial for trial in self.trials if trial.best is not None]
        return sorted(scored, key=lambda t: t.best if self.sweep.mode == "min" else -t.best)

    def best(self) -> TrialResult | None:
        """The best trial that has a checkpoint to export."""
        return next((t for t in self.ranked() if t.checkpoint is not None), None)

    def rows(self) -> list[dict[str, Any]]:
        """The table's rows, URL credentials redacted (a searched value or a path may hold one)."""
        metric = self.sweep.metric
        return [
            redacted(
                {
                    "trial": trial.name,
                    "status": trial.status,
                    "step": trial.step,
                    **trial.params,
                    f"best/{metric}": trial.best,
                    **{f"final/{name}": value for name, value in trial.final.items()},
                    "checkpoint": trial.checkpoint,
                    "run": trial.run,
                    "tensorboard": str(trial.tensorboard),
                    "error": trial.error,
                }
            )
            for trial in self.trials
        ]

    def write(self, folder: StorageFolder) -> None:
        """The table and the plot into the sweep's folder."""
        table = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.rows()), table)
        self.files[TABLE_NAME] = table.getvalue()
        self._write(folder, "table", TABLE_NAME)
        points = [(t.params, t.best) for t in self.trials if t.best is not None]
        if points:
            figure = plot_metric_against_parameters(
                points, list(self.sweep.space.values()), self.sweep.metric, self.sweep.mode
            )
            png = io.BytesIO()
            figure.savefig(png, format="png")
            plot_name = f"{self.sweep.metric.replace('/', '_')}.png"
            self.files[plot_name] = png.getvalue()
            self._write(folder, "plot", plot_name)

    def _write(self, folder: StorageFolder, what: str, name: str) -> None:
        path = f"{folder.path}/{name}"
        with folder.filesystem.open_output_stream(path) as stream:
            stream.write(self.files[name])
        self.written[what] = folder.uri(path)

    def summary(self) -> str:
        """What the terminal shows at the end: the ranking, the best trial, where things are;
        URL credentials redacted."""
        metric, sweep = self.sweep.metric, self.sweep
        counts: dict[str, int] = {}
        for trial in self.trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        lines = [
            f"sweep {sweep.name}: {len(self.trials)} trials ("
            + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            + f"), ranked by {'lowest' if sweep.mode == 'min' else 'highest'} {metric}"
        ]
        header = ["rank", "trial", "status", "step", f"best {metric}", *sweep.space]
        table = [header]
        for rank, trial in enumerate(self.ranked(), start=1):
            values = [trial.params.get(path) for path in sweep.space]
            table.append(
                [
                    str(rank),
                    trial.name,
                    trial.status,
                    str(trial.step),
                    *map(_number, [trial.best, *values]),
                ]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines += [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in table
        ]
        unscored = [t for t in self.trials if t.best is None]
        for trial in unscored:
            why = trial.error.splitlines()[0] if trial.error else f"never reported {metric}"
            lines.append(f"{trial.name}: {trial.status}: {why}")
        best = self.best()
        if best is None:
            lines.append(f"no trial has both {metric} and a checkpoint: nothing to export")
        else:
            lines.append(f"best: {best.name}, {metric} {_number(best.best)}, run {best.run}")
        for what, where in self.written.items():
            lines.append(f"{what}: {where}")
        if self.exported is not None:
            lines.append(f"exported: {self.exported}")
        lines.append(f"TensorBoard: tensorboard --logdir {self.log_folder}")
        return redact_url("\n".join(lines))


def collect_results(
    grid: ResultGrid, sweep: SweepConfig, base: Config, runs_uri: str, log_folder: Path
) -> SweepResults:
    """Each trial's outcome, from Tune's results and the trial's training run."""
    trials = []
    for result in grid:
        name = Path(result.path).name
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        best = None
        if history is not None and sweep.metric in history.columns:
            values = history[sweep.metric].dropna()
            if len(values):
                best = float(values.min() if sweep.mode == "min" else values.max())
        store = CheckpointStore(runs_uri, name, s3_options(base.data))
        latest = store.latest()
        trials.append(
            TrialResult(
                name=name,
                status=_status(result.error, metrics, sweep.metric, base.train.steps),
                # Tune keeps a trial's values with its results: none without a report.
                params={path: (result.config or {}).get(path) for path in sweep.space},
                step=metrics.get("step"),
                best=best,
                final={
                    key: value
                    for key, value in metrics.items()
                    if (key == sweep.metric or key.startswith(FINAL_PREFIXES))
                    and isinstance(value, (int, float))
                },
                run=store.uri(store.run_path),
                checkpoint=store.uri(latest.path) if latest else None,
                tensorboard=log_folder / name / TENSORBOARD_NAME,
                error=redact_url(str(result.error)) if result.error else None,
            )
        )
    return SweepResults(sweep, trials, log_folder)


def _status(error: Exception | None, metrics: dict[str, Any], metric: str, steps: int) -> str:
    if error is not None:
        return "failed"
    if metric not in metrics:
        return "no metric"
    return "finished" if metrics.get("step", 0) >= steps else "stopped early"


def _number(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
