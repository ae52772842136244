"""A sweep's configuration: which training job, what to search and how, and where it all goes.

`python -m ulm_dist.tune --config jobs/sweep.yaml` reads one of these. As with the training
config (config.py), every field has a type, a default and a one-line meaning, and a bad value
is refused with its dotted name. The search space names training config fields by their dotted
path (`loss.lambda_cycle`); every candidate value (each listed value, each end of a range) is
applied to the base job on load, so a misspelt path or an out-of-range value is refused before
any trial starts, naming both the sweep's field and the training config's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ulm_dist.config import (
    Config,
    ConfigError,
    build_section,
    check_folder_name,
    load_config,
    option,
    read_yaml_mapping,
)
from ulm_dist.evaluate.regression import VAL_LANDMARK_ERROR

# Fields the sweep sets for every trial itself: each trial is its own run in the sweep's folders.
SWEEP_OWNED = ("train.run_name", "train.storage", "train.log_dir", "train.resume")
PARAMETER_KINDS = ("values", "uniform", "loguniform", "randint")


@dataclass
class SearchConfig:
    algorithm: Literal["grid", "random", "optuna"] = option(
        "random",
        "grid: every combination of the `values` lists; random: independent draws; optuna: "
        "Optuna's TPE, which draws more where earlier trials did well (pip install optuna)",
    )
    num_samples: int = option(
        4, "trials to run; for grid, how many times the whole grid is run", min=1
    )
    seed: int | None = option(0, "seed of the random and optuna draws (None: different each run)")
    max_concurrent_trials: int = option(
        0, "trials training at once; 0: as many as the cluster's CPUs and GPUs hold", min=0
    )


@dataclass
class SchedulerConfig:
    name: Literal["asha", "fifo"] = option(
        "asha",
        "asha: stop a trial whose metric trails the others' at the same step (asynchronous "
        "successive halving); fifo: train every trial to the end",
    )
    grace_period: int = option(
        100, "training steps every trial gets before ASHA may stop it", min=1
    )
    reduction_factor: int = option(
        3, "ASHA keeps the best 1/reduction_factor of the trials at each rung", min=2
    )


@dataclass(frozen=True)
class Parameter:
    """One searched training config field: listed values, or a range to draw from."""

    path: str  # dotted training config field, e.g. "loss.lambda_cycle"
    kind: Literal["values", "uniform", "loguniform", "randint"]
    values: tuple[Any, ...]  # the listed values, or (low, high), both ends included


@dataclass
class SweepConfig:
    name: str = option(
        "sweep",
        "sweep name: <storage>/<name> holds its state, trial runs and results table; "
        "<log_dir>/<name> its TensorBoard logs; rerunning with the same name continues it",
    )
    base: str | None = option(
        None, "training job YAML every trial starts from, relative to the working folder"
    )
    overrides: list[str] = option(
        [], "section.key=value changes to the base job for every trial (as on train's CLI)"
    )
    metric: str = option(VAL_LANDMARK_ERROR, "reported metric that ranks the trials")
    mode: Literal["min", "max"] = option("min", "min: lower metric is better; max: higher")
    storage: str = option(
        "runs/sweeps",
        "local folder or s3://bucket/prefix (endpoint: the base job's data.s3_endpoint_url)",
    )
    log_dir: str = option("runs", "local folder for TensorBoard: <log_dir>/<name>/<trial>")
    export_dir: str | None = option(
        None, "local folder for the best trial's exported model (None: <log_dir>/<name>/best)"
    )
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    space: dict[str, Parameter] = option(
        {}, "searched training config fields: dotted path -> {values: [...]} or a range"
    )

    def base_config(self, extra: list[str] | None = None) -> Config:
        """The base job with the sweep's overrides, then `extra` key=value overrides."""
        return load_config(self.base, [*self.overrides, *(extra or [])])

    def trial_config(self, params: dict[str, Any], extra: list[str]) -> Config:
        """A trial's training config: the base job with the trial's values, then `extra`."""
        return self.base_config([*parameter_overrides(params), *extra])

    def validate(self) -> None:
        check_folder_name(self.name, "name")
        if not self.space:
            raise ConfigError("space: expected at least one training config field to search")
        for item in self.overrides:
            key = item.partition("=")[0]
            if key in SWEEP_OWNED:
                raise ConfigError(f"overrides: {key} is set by the sweep for each trial")
        try:
            base = self.base_config()
        except ConfigError as error:
            raise ConfigError(f"base/overrides: {error}") from error
        # Each listed value and each end of a range must make a valid training config.
        for parameter in self.space.values():
            for value in parameter.values:
                try:
                    self.trial_config({parameter.path: value}, [])
                except ConfigError as error:
                    raise ConfigError(f"space.{parameter.path}: {error}") from error
        if self.search.algorithm == "grid":
            ranges = [p.path for p in self.space.values() if p.kind != "values"]
            if ranges:
                raise ConfigError(
                    f"space.{ranges[0]}: search.algorithm grid needs a `values` list for every "
                    "parameter; use random or optuna to draw from ranges"
                )
        if self.metric.startswith("val/") and base.data.val_spec() is None:
            raise ConfigError(
                f"metric: {self.metric} is measured on annotated validation shards, but the "
                "base job has no data.val; set it (in the base job or overrides) or rank the "
                "trials by another metric"
            )
        if self.scheduler.name == "asha" and self.scheduler.grace_period > base.train.steps:
            raise ConfigError(
                f"scheduler.grace_period: {self.scheduler.grace_period} steps is more than the "
                f"{base.train.steps} each trial trains (train.steps); lower it"
            )


def parameter_overrides(params: dict[str, Any]) -> list[str]:
    # JSON is YAML, so load_config reads each value back exactly as given.
    return [f"{path}={json.dumps(value)}" for path, value in params.items()]


def load_sweep_config(path: str | Path) -> SweepConfig:
    """The sweep YAML at `path`, checked field by field and against the base job."""
    return sweep_config_from_dict(read_yaml_mapping(path, "sweep fields"))


def sweep_config_from_dict(raw: dict[str, Any]) -> SweepConfig:
    raw = dict(raw)
    space = raw.pop("space", None)
    # The space maps training config paths to parameters, which the generic builder cannot type.
    sweep = build_section(SweepConfig, raw, "")
    sweep.space = parse_space(space)
    sweep.validate()
    return sweep


def parse_space(raw: Any) -> dict[str, Parameter]:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"space: expected a mapping of training config fields to parameters, got {raw!r}"
        )
    for path in raw:
        if path in SWEEP_OWNED:
            raise ConfigError(f"space.{path}: set by the sweep for each trial, cannot be searched")
    return {path: parse_parameter(path, spec) for path, spec in raw.items()}


def parse_parameter(path: str, raw: Any) -> Parameter:
    where = f"space.{path}"
    if not isinstance(raw, dict) or len(raw) != 1 or next(iter(raw)) not in PARAMETER_KINDS:
        raise ConfigError(
            f"{where}: expected one of {{values: [a, b, ...]}}, {{uniform: [low, high]}}, "
            f"{{loguniform: [low, high]}} or {{randint: [low, high]}}, got {raw!r}"
        )
    ((kind, values),) = raw.items()
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    if kind != "values":
        check_range(f"{where}.{kind}", kind, values)
    return Parameter(path, kind, tuple(values))


def check_range(where: str, kind: str, bounds: list[Any]) -> None:
    number = int if kind == "randint" else (int, float)
    if len(bounds) != 2 or not all(
        isinstance(b, number) and not isinstance(b, bool) for b in bounds
    ):
        expected = "two integers" if kind == "randint" else "two numbers"
        raise ConfigError(f"{where}: expected [low, high], {expected}, got {bounds!r}")
    low, high = bounds
    if low > high or (low == high and kind != "randint"):
        raise ConfigError(f"{where}: expected low < high, got {bounds!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: a log-uniform range needs low > 0, got {low}")
