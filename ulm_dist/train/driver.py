"""The main job: train the landmark learner on N Ray Train workers with DeepSpeed.

    python -m ulm_dist.train [--config jobs/<file>.yaml] [--resume auto|never|PATH]
                             [--verbose] [section.key=value ...]

With no arguments it trains the embedded default: local Ray (or the cluster in RAY_ADDRESS,
as under `ray job submit`), the synthetic data set, the tiny preset, 2 workers, CPU if the
cluster has no GPU, checkpoints in `runs/<run_name>`. Everything that can be checked is
checked before any worker starts: config keys and values, storage, resume point and data
before Ray starts, then device and precision (`preflight.py`). Then a `TorchTrainer` runs
`worker.train_func` on every worker. A reporter running in Ray Train's controller marks
checkpoints complete, writes the metrics and sends the progress lines that this driver
prints; checkpoints reported with `val/` metrics (see `evaluate/periodic.py`) carry them in
their completion marker, for picking the best one, then prunes the old ones
(`train.keep_checkpoints`). A rerun with the same run name continues from the run's newest
complete checkpoint (`train.resume`); the checkpoint store (`checkpoint.py`), not Ray
Train's own list of reported checkpoints, says which that is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import posixpath
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from ulm_dist.config import Config, ConfigError, load_config
from ulm_dist.evaluate.regression import VAL_LANDMARK_ERROR, VAL_PREFIX
from ulm_dist.extras import MissingExtraError
from ulm_dist.redaction import print_redacted, redacted, redacted_config
from ulm_dist.storage import StorageError, s3_options
from ulm_dist.train.checkpoint import (
    RUN_CONFIG_NAME,
    CheckpointStore,
    StoredCheckpoint,
    picture_tag,
    resume_checkpoint,
)
from ulm_dist.train.curves import write_training_curves
from ulm_dist.train.metrics_log import TENSORBOARD_NAME, MetricsLog, progress_line, read_metrics
from ulm_dist.train.preflight import (
    check_perceptual_weights,
    choose_device,
    choose_precision,
    prepare_data,
    prepare_val_data,
    start_ray,
)
from ulm_dist.train.tracking import (
    EVALUATION_FOLDER,
    MlflowRun,
    TrackingError,
    check_tracking,
    tracking_warning,
    training_run,
)
from ulm_dist.train.worker import train_func

# What shells report for a command ended by SIGINT (128 + 2).
INTERRUPTED_EXIT_CODE = 130
SUMMARY_NAME = "summary.json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    try:
        train(load_config(args.config, overrides), verbose=args.verbose)
    except (ConfigError, StorageError, MissingExtraError, TrackingError) as error:
        print_redacted(f"ulm_dist.train: error: {error}", file=sys.stderr)
        return 2
    except ray.train.TrainingFailedError as error:
        print_redacted(f"ulm_dist.train: training failed: {error}", file=sys.stderr)
        return 1
    except Interrupted as stopped:
        print_redacted(f"ulm_dist.train: stopped: {stopped}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ulm_dist.train",
        description="Train the landmark learner with Ray Train + DeepSpeed.",
    )
    parser.add_argument("--config", help="job YAML (jobs/*.yaml); defaults apply without it")
    parser.add_argument(
        "--resume",
        help="auto (default): continue the run from its latest checkpoint, if any; never: "
        "refuse if it has one; PATH: start from that checkpoint while the run has none of its "
        "own (same as train.resume=...)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's and the workers' own logs"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    # Intermixed: options and key=value overrides may come in any order.
    return parser.parse_intermixed_args(argv)


def train(
    cfg: Config,
    verbose: bool = False,
    callbacks: Sequence[UserCallback] = (),
    tracking_parent: MlflowRun | None = None,
) -> ray.train.Result:
    """Check what can be checked, start the workers, and print where the results are.

    `callbacks` see every report after the run's own reporter (a sweep passes the one that
    forwards reports to Ray Tune, see tune/sweep.py). With `train.tracking: mlflow` the run
    is recorded in MLflow (`tracking.py`), as a child of `tracking_parent` if given (a
    sweep's run)."""
    check_tracking(cfg)
    store = CheckpointStore(cfg.train.storage, cfg.train.run_name, s3_options(cfg.data))
    store.check_writable()
    start = check_resume(cfg, store)
    shards = prepare_data(cfg)
    val_shards = prepare_val_data(cfg)
    check_perceptual_weights(cfg)
    use_gpu = choose_device(cfg, verbose)
    precision = choose_precision(cfg, use_gpu)

    config_text = yaml.safe_dump(redacted_config(cfg), sort_keys=False)
    store.write_config(config_text)
    log_folder = Path(cfg.train.log_dir).expanduser().resolve() / cfg.train.run_name
    metrics_log = MetricsLog(log_folder)
    (log_folder / RUN_CONFIG_NAME).write_text(config_text)

    run_uri = store.uri(store.run_path)
    resumed_from = store.uri(start.path) if start is not None else None
    # Started before Ray: a tracking server that cannot be reached stops the run here.
    with training_run(cfg, run_uri, resumed_from, tracking_parent) as tracker:
        start_ray(verbose)
        forget_ray_checkpoint_list(store)
        lines = Queue(actor_options={"num_cpus": 0})
        # Ray Train would move each worker into a scratch folder of its own; staying in the
        # driver's working folder keeps relative paths in the config meaning the same there.
        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        reporter = RunReporter(store, metrics_log, cfg, lines, tracker)
        trainer = TorchTrainer(
            train_func,
            train_loop_config={
                "config": cfg.to_dict(),
                "shards": shards,
                "val_shards": val_shards,
                "precision": precision,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.train.num_workers, use_gpu=use_gpu
            ),
            run_config=ray.train.RunConfig(
                name=cfg.train.run_name,
                storage_path=store.root,
                storage_filesystem=store.filesystem,
                failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
                # No num_to_keep: Ray would prune by its own list, blind to completion markers;
                # the reporter prunes by the store's (CheckpointStore.prune).
                callbacks=[reporter, *callbacks],
                logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            ),
        )
        print_redacted(
            f"run {cfg.train.run_name}: {cfg.train.num_workers} workers on "
            f"{'GPU' if use_gpu else 'CPU'}, {precision}, ZeRO-{cfg.train.zero_stage}; "
            f"{cfg.train.steps} steps x {cfg.train.batch_size} pairs; store {run_uri}"
        )
        announce_start(cfg, store, start)
        if val_shards is not None:
            every = cfg.train.eval_every or cfg.train.checkpoint_every
            print_redacted(
                f"evaluating on {cfg.data.val_spec()} (val split, {cfg.train.eval_samples} "
                f"images) every {every} steps: {VAL_LANDMARK_ERROR}"
            )
        if tracker is not None:
            print_redacted(f"MLflow: run {tracker.run_id} at {tracker.tracking_uri}")
        try:
            with printing_lines(lines):
                result = fit_interruptibly(trainer)
        except KeyboardInterrupt:
            if tracker is not None:
                tracker.end_status = "KILLED"
            raise Interrupted(stop_workers(store)) from None
        except ray.train.ControllerError as error:
            raise named_controller_error(error, store) from None
        except ray.train.WorkerGroupError as error:
            raise named_worker_error(error) from None

        latest = store.latest()
        final = store.uri(latest.path) if latest else "none"
        curves = write_training_curves(log_folder)
        # Read back: the reporter appended the records in Ray Train's controller, not here.
        records = read_metrics(metrics_log.path)
        summary = write_summary(log_folder, cfg, run_uri, final, records)
        if tracker is not None:
            track_outputs(
                tracker, [summary, metrics_log.path, curves, log_folder / RUN_CONFIG_NAME]
            )
    print_redacted(
        f"checkpoint: {final}\n"
        f"metrics:    {metrics_log.path}\n"
        f"curves:     {curves}\n"
        f"summary:    {summary}\n"
        f"run folder: {run_uri} (config, checkpoints, Ray Train's state)\n"
        f"TensorBoard: tensorboard --logdir {log_folder / TENSORBOARD_NAME}"
    )
    return result


def write_summary(
    log_folder: Path, cfg: Config, run_uri: str, checkpoint: str, records: list[dict[str, Any]]
) -> Path:
    """summary.json beside metrics.jsonl: where the run ended, its last report, and its best
    validation error (with the step it was measured at), if it evaluated."""
    evaluated = [record for record in records if VAL_LANDMARK_ERROR in record]
    best = min(evaluated, key=lambda record: record[VAL_LANDMARK_ERROR], default=None)
    summary = {
        "run_name": cfg.train.run_name,
        "run": run_uri,
        "checkpoint": checkpoint,
        "steps": cfg.train.steps,
        "final": records[-1] if records else {},
        "best": {"step": best["step"], VAL_LANDMARK_ERROR: best[VAL_LANDMARK_ERROR]}
        if best
        else None,
    }
    path = log_folder / SUMMARY_NAME
    path.write_text(json.dumps(redacted(summary), indent=1) + "\n")
    return path


def track_outputs(tracker: MlflowRun, paths: list[Path | None]) -> None:
    """The run's own files (summary, metrics, curves, config) as the MLflow run's artifacts,
    once training is done; a file that cannot be logged is a warning, and the run ends as it
    would without tracking (`RunReporter.track`)."""
    for path in paths:
        if path is not None:
            warning = tracking_warning(f"log {path.name}", tracker.log_file, path)
            if warning is not None:
                print_redacted(warning, file=sys.stderr)


class Interrupted(Exception):
    """Ctrl-C on the driver stopped the run; the message says where it stands."""


def fit_interruptibly(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()`, run in a thread of its own so that Ctrl-C raises KeyboardInterrupt
    in this one. In the main thread, fit() would install Ray Train's own SIGINT handler,
    which aborts the run without a word and leaves the workers a few more steps to upload
    checkpoints that nothing marks complete. Elsewhere (a Tune trial) no SIGINT arrives, and
    fit() runs where it is called."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    # A daemon: after Ctrl-C, its wait on the stopped run must not hold the process.
    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def stop_workers(store: CheckpointStore) -> str:
    """After Ctrl-C: end the run's workers and say which checkpoint to continue from.

    Disconnecting ends the driver's Ray job, and with it Ray Train's controller and the
    workers it owns (on a local cluster, the cluster too). A checkpoint they were uploading
    stays incomplete, without a marker: the store passes over it."""
    print_redacted("interrupted (Ctrl-C): stopping the workers", file=sys.stderr)
    ray.shutdown()
    latest = store.latest()
    if latest is None:
        return "no complete checkpoint was written; the same command starts the run afresh"
    return (
        f"last complete checkpoint: {store.uri(latest.path)} (step {latest.step}); the same "
        "command continues the run from it"
    )


def named_controller_error(
    error: ray.train.ControllerError, store: CheckpointStore
) -> ray.train.ControllerError:
    """`error` again, naming the store and the operation when the store failed Ray Train's
    controller writing its own list of reported checkpoints into the run folder (before the
    reporter sees a checkpoint): in an outage that write can be the first to fail, and the
    client's words alone name neither the store nor what to do."""
    failure = error.controller_failure
    if not (isinstance(failure, OSError) and CHECKPOINT_MANAGER_SNAPSHOT_FILENAME in str(failure)):
        return error
    return ray.train.ControllerError(
        store.storage_error("Ray Train's controller writing its list of checkpoints", failure)
    )


def named_worker_error(error: ray.train.WorkerGroupError) -> ray.train.WorkerGroupError:
    """`error` again, led by the workers' StorageErrors in full when there are any. Ray Train
    shows each worker's traceback cut to its first and last 500 characters, which can drop
    the store and the operation from the middle of the message."""
    ranks_by_message: dict[str, list[str]] = {}
    for rank, failure in sorted(error.worker_failures.items()):
        # Ray Train wraps what the worker raised, with its traceback, in an exception of its own.
        raised = getattr(failure, "_base_exc", failure)
        if isinstance(raised, StorageError):
            ranks_by_message.setdefault(str(raised), []).append(str(rank))
    if not ranks_by_message:
        return error
    summary = "\n".join(
        f"worker {', '.join(ranks)}: {message}" for message, ranks in ranks_by_message.items()
    )
    return ray.train.WorkerGroupError(summary, error.worker_failures)


class RunReporter(UserCallback):
    """Called by Ray Train in its controller, on the driver's node, once every worker has
    reported. By then every worker's upload of a reported checkpoint is done, so this is
    where the checkpoint is marked complete; the metrics go to the run's log and a progress
    line to the driver."""

    def __init__(
        self,
        store: CheckpointStore,
        metrics_log: MetricsLog,
        cfg: Config,
        lines: Queue,
        tracker: MlflowRun | None = None,
    ):
        self.store = store
        self.metrics_log = metrics_log
        self.tracker = tracker
        self.total_steps = cfg.train.steps
        self.keep_checkpoints = cfg.train.keep_checkpoints
        self.max_failures = cfg.train.max_failures
        self.failures = 0
        self.lines = lines

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: ray.train.Checkpoint | None,
    ) -> None:
        record = metrics[0]  # every worker reports the same run-wide values
        line = progress_line(record, self.total_steps)
        scores = {name: value for name, value in record.items() if name.startswith(VAL_PREFIX)}
        if checkpoint is not None:
            self.store.mark_complete(
                checkpoint.path, record["step"], world_size=len(metrics), metrics=scores
            )
            line += f" | saved {Path(checkpoint.path).name}"
        # Logged once the checkpoint is complete and before pruning: a store failing the
        # prune must not leave a complete checkpoint whose step is missing from the log.
        if self.metrics_log.append(record):
            self.lines.put(
                f"resumed from the latest checkpoint: the reports from step {record['step']} "
                "on replace those of the failed attempt"
            )
        if self.tracker is not None:
            # MLflow keeps every value logged: after a resume, a step reported again has two.
            self.track(
                f"log the metrics of step {record['step']}", self.tracker.log_metrics, record
            )
        if checkpoint is not None:
            self.store.prune(self.keep_checkpoints)
        if checkpoint is not None and scores:  # only an evaluated step has pictures
            self.log_pictures(checkpoint, record["step"])
        self.lines.put(line)

    def log_pictures(self, checkpoint: ray.train.Checkpoint, step: int) -> None:
        """The val pictures a worker put into the checkpoint, into TensorBoard."""
        pictures = {}
        with self.store.named_errors(f"reading the val pictures of {Path(checkpoint.path).name}"):
            entries = checkpoint.filesystem.get_file_info(pafs.FileSelector(checkpoint.path))
            for entry in sorted(entries, key=lambda entry: entry.path):
                tag = picture_tag(entry.base_name)
                if tag is not None and entry.type == pafs.FileType.File:
                    with checkpoint.filesystem.open_input_stream(entry.path) as stream:
                        pictures[tag] = stream.read()
        for tag, png in pictures.items():
            self.metrics_log.add_image(tag, png, step)
            if self.tracker is not None:
                name = f"{tag.removeprefix(VAL_PREFIX).replace('/', '_')}.png"
                folder = f"{EVALUATION_FOLDER}/step_{step:08d}"
                self.track(f"log {folder}/{name}", self.tracker.log_bytes, png, name, folder)

    def track(self, action: str, log: Callable[..., None], *args: Any) -> None:
        """`log(*args)` into MLflow; a failure is a warning line, and training goes on: a
        tracking server's outage must not end a run that the store and metrics.jsonl record."""
        warning = tracking_warning(action, log, *args)
        if warning is not None:
            self.lines.put(warning)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
            self.lines.put(f"worker {rank} failed: {first_line}")
        self.failures += 1
        if self.failures > self.max_failures:
            self.lines.put(f"no restarts left (train.max_failures={self.max_failures})")
        else:
            try:
                latest = self.store.latest()
                start = Path(latest.path).name if latest else "scratch (no complete checkpoint)"
            except StorageError as error:
                # Raised here, it would end the run in the controller: the workers, not
                # this message, decide whether the store is back.
                start = f"the newest complete checkpoint (which could not be listed: {error})"
            self.lines.put(
                f"restarting the workers from {start} "
                f"(failure {self.failures} of at most train.max_failures={self.max_failures})"
            )


@contextlib.contextmanager
def printing_lines(lines: Queue) -> Iterator[None]:
    """Print, on the driver, the lines the reporter sends, until the block ends."""

    def print_until_done() -> None:
        while (line := lines.get()) is not None:
            print_redacted(line)

    printer = threading.Thread(target=print_until_done, daemon=True)
    printer.start()
    try:
        yield
    finally:
        lines.put(None)
        printer.join()


def check_resume(cfg: Config, store: CheckpointStore) -> StoredCheckpoint | None:
    """The checkpoint the workers will start from (`checkpoint.resume_checkpoint`); a resume
    setting that cannot work (another run's checkpoint already at train.steps, another number
    of workers) is refused before anything starts."""
    if cfg.train.resume == "never" and store.has_checkpoint_folders():
        raise ConfigError(
            f"train.resume: never, but run {cfg.train.run_name!r} already has checkpoints in "
            f"{store.uri(store.run_path)}; choose another train.run_name, delete that "
            "folder, or resume with train.resume=auto"
        )
    start = resume_checkpoint(store, cfg.train.resume)
    if start is not None and not in_run(store, start) and start.step >= cfg.train.steps:
        # The worker trains while its step is below train.steps: here, not at all.
        raise ConfigError(
            f"train.steps: {cfg.train.steps}, but the checkpoint to start from (train.resume: "
            f"{store.uri(start.path)}) is already at step {start.step}, so this run would train "
            "0 steps; train.steps counts the checkpoint's steps too: set it to the total, the "
            "checkpoint's step plus the steps to train from it (e.g. "
            f"train.steps={start.step + cfg.train.steps} for {cfg.train.steps} more)"
        )
    if start is not None and start.info.get("world_size") != cfg.train.num_workers:
        raise ConfigError(
            f"train.num_workers: the checkpoint to resume from ({store.uri(start.path)}) was "
            f"written by {start.info.get('world_size')} workers, this run has "
            f"{cfg.train.num_workers}; ZeRO shards its state per worker, so resume with "
            f"train.num_workers={start.info.get('world_size')} or start a new run"
        )
    return start


def in_run(store: CheckpointStore, checkpoint: StoredCheckpoint) -> bool:
    """Whether `checkpoint` is one of the run's own, not another run's named by train.resume."""
    return posixpath.dirname(checkpoint.path) == store.run_path


def announce_start(cfg: Config, store: CheckpointStore, start: StoredCheckpoint | None) -> None:
    """Print where the run starts, and each newer checkpoint folder passed over as
    incomplete (a save cut short, a file deleted): training redoes its steps. A run whose
    latest checkpoint is at train.steps is done: its workers start, load it and stop."""
    newest = start.step if start is not None and in_run(store, start) else -1
    for skipped in store.scan().incomplete:
        if skipped.step > newest:
            print_redacted(
                f"skipping {store.uri(skipped.path)}: incomplete ({skipped.reason}); its steps "
                "are trained again"
            )
    if start is not None and start.step >= cfg.train.steps:
        print_redacted(
            f"run {cfg.train.run_name} is already complete: its latest checkpoint "
            f"{store.uri(start.path)} is at step {start.step} of train.steps={cfg.train.steps}; "
            "nothing is trained (raise train.steps to train it further)"
        )
    elif start is not None:
        print_redacted(f"resuming from {store.uri(start.path)} (step {start.step})")


def forget_ray_checkpoint_list(store: CheckpointStore) -> None:
    """Delete the list of reported checkpoints that Ray Train keeps in the run folder. On a
    rerun Ray would offer the last one it lists, complete or not, and refuse to start at all
    once the reporter has pruned one it lists; the workers resume from the store's newest
    complete checkpoint instead (`checkpoint.resume_checkpoint`)."""
    store.delete_file(
        CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, "deleting Ray Train's list of checkpoints"
    )
