"""Hyperparameter sweeps with Ray Tune: many training runs, ranked by one reported metric.

    python -m ulm_dist.tune --config jobs/sweep.yaml

Each Tune trial is a full training run: a function that takes the trial's values, builds the
trial's training config (`config.py`) and calls `train.driver.train`, which starts a TorchTrainer
with its own Ray Train workers and DeepSpeed engines (Ray Train V2's way of running Train
inside Tune). A callback forwards the run's reports to Tune; ASHA stops trials that trail.
Everything lives in the sweep's folder, `<storage>/<name>/` (local or S3):

    <name>/trial_<id>/          Tune's record of each trial
    <name>/runs/trial_<id>/     the trial's training run and its checkpoints
    <name>/trials.parquet       one row per trial: values, final and best metric, checkpoint
    <name>/<metric>.png         the metric against each searched parameter

and TensorBoard logs of every trial under `<log_dir>/<name>/` (`tensorboard --logdir` there).
With the base job's `train.tracking: mlflow`, the sweep is one MLflow run (its fields as
params; the table, the plot and the ranking as artifacts) and each trial's training run is a
child of it (`train/tracking.py`). At the end the best trial's checkpoint is exported
(`deploy/export.py`). Running the same command again continues an interrupted sweep
(Tuner.restore): finished trials are kept, unfinished ones continue from their runs' latest
checkpoints, and the searcher picks up where it was (in MLflow, as a new parent run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import ray.train
import ray.tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from ulm_dist.config import Config, ConfigError
from ulm_dist.deploy.export import ExportError, resolve_checkpoint
from ulm_dist.deploy.export import export as export_artifact
from ulm_dist.deploy.onnx_detector import can_export
from ulm_dist.deploy.trained import load_trained
from ulm_dist.extras import MissingExtraError
from ulm_dist.redaction import print_redacted, redacted_errors
from ulm_dist.storage import S3Options, StorageError, StorageFolder, s3_options
from ulm_dist.train.driver import train
from ulm_dist.train.preflight import (
    check_perceptual_weights,
    choose_device,
    choose_precision,
    prepare_data,
    start_ray,
)
from ulm_dist.train.tracking import (
    SWEEP_TAG,
    MlflowRun,
    TrackingError,
    check_tracking,
    flat_params,
    mlflow_run,
    tracking_warning,
)
from ulm_dist.tune.config import SweepConfig, load_sweep_config
from ulm_dist.tune.results import SweepResults, collect_results

# A trial only launches and watches its Train workers, which reserve their own CPUs and GPUs.
# Ray refuses an empty resource request, hence a token share instead of none.
TRIAL_DRIVER_CPUS = 0.01
TRIAL_RUNS = "runs"
SUMMARY_NAME = "summary.txt"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep = load_sweep_config(args.config)
        results = run_sweep(sweep, verbose=args.verbose)
    except (ConfigError, StorageError, ExportError, MissingExtraError, TrackingError) as error:
        print_redacted(f"ulm_dist.tune: error: {error}", file=sys.stderr)
        return 2
    if results is None:
        return 1
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ulm_dist.tune",
        description="Sweep training hyperparameters with Ray Tune; each trial is a training run.",
    )
    parser.add_argument("--config", required=True, help="sweep YAML (see jobs/sweep.yaml)")
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's and the trials' own logs"
    )
    return parser.parse_args(argv)


def run_sweep(sweep: SweepConfig, verbose: bool = False) -> SweepResults | None:
    """Run (or continue) the sweep; the results once every trial is done, else None."""
    base = sweep.base_config()
    check_tracking(base)
    folder = StorageFolder(sweep.storage, sweep.name, s3_options(base.data))
    folder.check_writable()
    # Checked (and the synthetic set generated, the ImageNet weights fetched) once, before Ray
    # starts: concurrent trials must not all do it at once.
    prepare_data(base)
    check_perceptual_weights(base)
    start_ray(verbose)
    # Decided once here: a trial asking the cluster could wait on a GPU its neighbours hold.
    use_gpu = choose_device(base, verbose)
    precision = choose_precision(base, use_gpu)
    log_folder = Path(sweep.log_dir).expanduser().resolve() / sweep.name
    runs_uri = folder.uri(f"{folder.path}/{TRIAL_RUNS}")
    fixed = [
        f"train.storage={runs_uri}",
        f"train.log_dir={log_folder}",
        f"train.device={'gpu' if use_gpu else 'cpu'}",
        f"train.precision={precision}",
        # A trial that Tune starts again continues its run from the latest checkpoint.
        "train.resume=auto",
    ]
    # Tune would start each trial in a scratch folder of its own; staying in the working
    # folder keeps relative paths in the job meaning the same. Tune passes this on to trials.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    with sweep_tracking(sweep, base, folder) as parent:
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(
                run_trial, sweep=sweep, fixed=fixed, verbose=verbose, parent=parent
            ),
            {"cpu": TRIAL_DRIVER_CPUS},
        )
        tuner = make_tuner(sweep, base, folder, trainable, use_gpu)
        grid = tuner.fit()

        unfinished = unfinished_trials(folder)
        if unfinished:
            print(
                f"sweep {sweep.name} interrupted with {unfinished} of {len(grid)} trials not "
                "done; run the same command again to continue it",
                flush=True,
            )
            if parent is not None:
                parent.end_status = "KILLED"
            return None
        results = collect_results(grid, sweep, base, runs_uri, log_folder)
        results.write(folder)
        export_dir = Path(sweep.export_dir or log_folder / "best").expanduser().resolve()
        results.exported = export_best(results, export_dir, s3_options(base.data))
        if parent is not None:
            track_results(parent, results)
    print_redacted(results.summary())
    return results


def make_tuner(
    sweep: SweepConfig,
    base: Config,
    folder: StorageFolder,
    trainable: Any,
    use_gpu: bool,
) -> ray.tune.Tuner:
    """A new Tuner, or the sweep's own restored from its folder if it was started before."""
    if ray.tune.Tuner.can_restore(folder.path, storage_filesystem=folder.filesystem):
        print_redacted(f"sweep {sweep.name}: continuing from {folder.uri(folder.path)}")
        # Errored trials resume too: their runs continue from their latest checkpoints.
        return ray.tune.Tuner.restore(
            folder.path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=folder.filesystem,
        )
    return ray.tune.Tuner(
        trainable,
        param_space=search_space(sweep),
        tune_config=ray.tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            search_alg=searcher(sweep, concurrent_trials(sweep, base, use_gpu)),
            scheduler=scheduler(sweep, base),
            num_samples=sweep.search.num_samples,
            trial_name_creator=trial_run_name,
            trial_dirname_creator=trial_run_name,
        ),
        run_config=ray.tune.RunConfig(
            name=sweep.name,
            storage_path=folder.root,
            storage_filesystem=folder.filesystem,
        ),
    )


def unfinished_trials(folder: StorageFolder) -> int:
    """Trials that the sweep's saved state has not finished. Read back from the folder: after
    Ctrl+C, Tune saves the trials it stops as running (so that they continue on restore), but
    the results it returns show them as terminated."""
    analysis = ray.tune.ExperimentAnalysis(folder.path, storage_filesystem=folder.filesystem)
    done = (Trial.TERMINATED, Trial.ERROR)
    return sum(trial.status not in done for trial in analysis.trials)


def run_trial(
    params: dict[str, Any],
    sweep: SweepConfig,
    fixed: list[str],
    verbose: bool,
    parent: MlflowRun | None = None,
) -> None:
    """One trial: a training run named after the trial, in the sweep's folders; in MLflow,
    a child of the sweep's run `parent`. Its error reaches Tune, and the trial's error.txt in
    the sweep's folder, with URL credentials redacted."""
    run_name = f"trial_{ray.tune.get_context().get_trial_id()}"
    cfg = sweep.trial_config(params, [*fixed, f"train.run_name={run_name}"])
    with redacted_errors():
        train(cfg, verbose, callbacks=[MetricReporter(sweep.metric)], tracking_parent=parent)


def sweep_tracking(
    sweep: SweepConfig, base: Config, folder: StorageFolder
) -> contextlib.AbstractContextManager[MlflowRun | None]:
    """The sweep's parent run in MLflow when the base job has `train.tracking: mlflow`
    (`train/tracking.py`): the sweep's fields as params, each searched parameter as
    `space.<path>`; the trials' training runs are its children. None otherwise."""
    if base.train.tracking != "mlflow":
        return contextlib.nullcontext()
    fields = {name: value for name, value in dataclasses.asdict(sweep).items() if name != "space"}
    space = {
        f"space.{path}": f"{parameter.kind} {list(parameter.values)}"
        for path, parameter in sweep.space.items()
    }
    return mlflow_run(
        base.train.tracking_uri,
        base.train.tracking_experiment,
        sweep.name,
        {**flat_params(fields), **space},
        {SWEEP_TAG: folder.uri(folder.path)},
    )


def track_results(parent: MlflowRun, results: SweepResults) -> None:
    """The sweep's table, plot and ranking as the parent run's artifacts (redacted where
    written, `tune/results.py`); the best value of the metric as its metric `best/<metric>`.
    What cannot be logged is a warning: the sweep's folder and printout hold it all."""
    files = {**results.files, SUMMARY_NAME: results.summary().encode()}
    warnings = [
        tracking_warning(f"log {name}", parent.log_bytes, data, name)
        for name, data in files.items()
    ]
    best = results.best()
    if best is not None:
        record = {"step": best.step or 0, f"best/{results.sweep.metric}": best.best}
        warnings.append(tracking_warning("log the best trial's metric", parent.log_metrics, record))
    for warning in warnings:
        if warning is not None:
            print_redacted(warning, file=sys.stderr)


def trial_run_name(trial: Any) -> str:
    # The same name as the trial's training run (run_trial), so the two are easy to pair.
    return f"trial_{trial.trial_id}"


class MetricReporter(TuneReportCallback):
    """Forwards to Tune the reports that measured the sweep's metric. The metric may be
    measured less often than the losses are reported (validation every `train.eval_every`
    steps); Tune, ASHA and the searchers expect it in every result they get, so each forwarded
    result also carries the latest value of every other metric."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric
        self.latest: dict[str, Any] = {}

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: ray.train.Checkpoint | None,
    ) -> None:
        self.latest.update(metrics[0])
        if self.metric in metrics[0]:
            super().after_report(run_context, [dict(self.latest)], checkpoint)


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param_space: training config paths to Tune's sampling domains."""
    space: dict[str, Any] = {}
    for path, parameter in sweep.space.items():
        low, high = parameter.values[0], parameter.values[-1]
        if parameter.kind == "values":
            grid = sweep.search.algorithm == "grid"
            space[path] = (ray.tune.grid_search if grid else ray.tune.choice)(
                list(parameter.values)
            )
        elif parameter.kind == "uniform":
            space[path] = ray.tune.uniform(low, high)
        elif parameter.kind == "loguniform":
            space[path] = ray.tune.loguniform(low, high)
        else:
            # Tune's upper bound is exclusive; the sweep's ranges include both ends.
            space[path] = ray.tune.randint(low, high + 1)
    return space


def searcher(sweep: SweepConfig, concurrency: int) -> Any:
    """Optuna's TPE, or Tune's basic generator, which expands grids and draws at random;
    either starts at most `concurrency` trials at a time. (TuneConfig's max_concurrent_trials
    is ignored when a search algorithm is given, so the limit is set here.)"""
    if sweep.search.algorithm != "optuna":
        return BasicVariantGenerator(random_state=sweep.search.seed, max_concurrent=concurrency)
    try:
        # Optional (the `sweep` extra); ray.tune.search.optuna imports without it.
        import optuna  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            "search.algorithm: optuna needs the optuna package; pip install 'ulm-dist[sweep]' "
            "(or optuna), or use random"
        ) from error
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=sweep.search.seed), max_concurrent=concurrency)


def scheduler(sweep: SweepConfig, base: Config) -> Any:
    if sweep.scheduler.name == "fifo":
        return FIFOScheduler()
    # Time is counted in training steps, so the rungs mean the same whatever log_every is.
    return ASHAScheduler(
        time_attr="step",
        max_t=base.train.steps,
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
    )


def concurrent_trials(sweep: SweepConfig, base: Config, use_gpu: bool) -> int:
    """The set limit, else how many trials' workers the cluster holds at once: more trials
    than that would only start drivers that wait for workers."""
    if sweep.search.max_concurrent_trials:
        return sweep.search.max_concurrent_trials
    resources = ray.cluster_resources()
    workers = base.train.num_workers
    fits = int(resources.get("CPU", 0) // (workers + TRIAL_DRIVER_CPUS))
    if use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // workers))
    return max(1, fits)


def export_best(results: SweepResults, out: Path, s3: S3Options) -> Path | None:
    """Export the best trial's run (its best checkpoint, as `deploy/export.py` picks) to `out`."""
    best = results.best()
    if best is None or best.checkpoint is None:
        return None
    uri, reason = resolve_checkpoint(best.run, "best", s3)
    print_redacted(f"exporting {best.name}: {uri} ({reason})")
    # With detector.onnx where the `onnx` extra is installed: a missing extra must not fail a
    # finished sweep at its last step.
    trained = load_trained(uri, s3)
    return export_artifact(trained, out, reason, overwrite=True, onnx=can_export())
