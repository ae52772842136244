"""What each Ray Train worker runs: `train_func(config)`, a loop around `train_step`.

Each worker builds the learner and its DeepSpeed engine (`engine.py`), streams its share of
the shards and trains to `train.steps`, one `train_step` (forward, backward, optimizer) at a
time, timed by the meter around it (`meters.py`). Every `train.log_every` steps it reports
run-wide metrics with `ray.train.report`; every `train.checkpoint_every` steps, and at the
last step, it reports a checkpoint too (`checkpoint.py` says what one holds). With
`data.val`, every `train.eval_every` steps (and at the last step) it adds the `val/`
landmark-regression metrics to that step's report and, on checkpoint steps, the pictures to
the checkpoint (`evaluate/periodic.py`). It starts from the run's newest complete checkpoint
in the store (a restart after a worker failure, or a rerun of the same run), else from
`train.resume` if that names a checkpoint (`checkpoint.resume_checkpoint`); Ray's own
`ray.train.get_checkpoint()` is only taken when it is that checkpoint.

The data stream restarts at every checkpoint, seeded with `train.seed + step`, so the step is
also the stream position: a resumed run sees exactly the batches an uninterrupted run sees,
without replaying what came before.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.train
import torch

from ulm_dist.config import Config, TrainConfig, config_from_dict
from ulm_dist.data import ShardSet, make_pair_loader
from ulm_dist.evaluate.periodic import ValidationSet, load_validation_set, validate
from ulm_dist.models import build_learner
from ulm_dist.storage import s3_options
from ulm_dist.train.checkpoint import (
    CheckpointStore,
    TrainState,
    restore_checkpoint,
    resume_checkpoint,
    write_checkpoint,
)
from ulm_dist.train.engine import build_engine, deepspeed_config, input_dtype
from ulm_dist.train.meters import DATA_WAIT, DeepSpeedCollectives, IntervalMeter

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

logger = logging.getLogger(__name__)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point; `config` is what the driver puts together."""
    cfg = config_from_dict(config["config"])
    train = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    store = CheckpointStore(train.storage, train.run_name, s3_options(cfg.data))

    # The same seed everywhere gives every worker the same initial weights.
    seed_everything(train.seed)
    learner = build_learner(cfg.model, cfg.loss)
    engine = build_engine(
        learner,
        deepspeed_config(train, world_size, config["precision"]),
        compile_backend=train.compile_backend if train.compile else None,
        channels_last=train.channels_last,
    )
    # Loaded before the per-worker seeding below: starting a DataLoader draws from the global
    # RNG, and here that draw cannot change what training sees after a resume.
    validation = load_validation(cfg, config["val_shards"])
    # From here on each worker draws its own random numbers.
    seed_everything(train.seed + 1 + rank)
    state = restore(engine, starting_checkpoint(cfg, store), rank)
    collectives = DeepSpeedCollectives() if train.time_collectives else None
    meter = IntervalMeter(engine.device, collectives)
    batches = None
    while state.step < train.steps:
        if batches is None:  # (re)started at the step: see the module doc
            batches = pair_batches(cfg, config["shards"], engine, rank, world_size, state.step)
        train_step(engine, batches, meter, train.grad_accum_steps)
        state.step += 1
        state.samples_seen += train.batch_size
        due = Due.at(state.step, train, validation is not None)
        if due.report:
            metrics, pictures = step_metrics(engine, state, meter, validation, due, world_size)
            if due.checkpoint:
                save_checkpoint(engine, state, cfg, store, metrics, rank, world_size, pictures)
                batches = None
            else:
                ray.train.report(metrics)
        if state.step == cfg.debug.fail_at_step:
            inject_fault_once(store, state.step, rank, world_size)


def train_step(
    engine: DeepSpeedEngine,
    batches: Iterator[dict[str, torch.Tensor]],
    meter: IntervalMeter,
    grad_accum_steps: int,
) -> None:
    """One optimizer step: forward and backward over `grad_accum_steps` micro-batches;
    DeepSpeed applies the optimizer at the last one (`engine.step` before it only counts)."""
    dtype = input_dtype(engine)
    for _ in range(grad_accum_steps):
        with meter.phase(DATA_WAIT):
            batch = next(batches)
        with meter.micro_batch(pairs=len(batch["image_i"]), skipped=int(batch["skipped"].sum())):
            with meter.phase("forward"):
                image_i = batch["image_i"].to(engine.device, dtype, non_blocking=True)
                image_j = batch["image_j"].to(engine.device, dtype, non_blocking=True)
                losses = engine(image_i, image_j)
            with meter.phase("backward"):
                engine.backward(losses["total"])
            with meter.phase("optimizer"):
                engine.step()
        meter.add_losses(losses)
    meter.end_step()


@dataclass(frozen=True)
class Due:
    """What a step owes besides training: a report, an evaluation, a checkpoint."""

    report: bool
    evaluation: bool
    checkpoint: bool

    @classmethod
    def at(cls, step: int, train: TrainConfig, evaluates: bool) -> Due:
        """The last step always gets a checkpoint and, with `data.val`, an evaluation."""
        last = step == train.steps
        checkpoint = step % train.checkpoint_every == 0 or last
        eval_every = train.eval_every or train.checkpoint_every
        evaluation = evaluates and (step % eval_every == 0 or last)
        return cls(checkpoint or evaluation or step % train.log_every == 0, evaluation, checkpoint)


def step_metrics(
    engine: DeepSpeedEngine,
    state: TrainState,
    meter: IntervalMeter,
    validation: ValidationSet | None,
    due: Due,
    world_size: int,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The report of this step (run-wide: every worker calls it at the same steps) and, when
    it is evaluated, the evaluation's pictures (PNG bytes by TensorBoard tag)."""
    metrics = meter.flush(world_size)
    state.skipped_total += metrics["data/skipped"]
    metrics["data/skipped_total"] = state.skipped_total
    metrics.update(step=state.step, samples_seen=state.samples_seen, lr=engine.get_lr()[0])
    pictures: dict[str, bytes] = {}
    if due.evaluation:
        # Collective under ZeRO-3: every worker evaluates at the same steps.
        scores, pictures = validate(engine.module, validation, engine.device, input_dtype(engine))
        metrics.update(scores)
    return metrics, pictures


def load_validation(cfg: Config, val_shards: ShardSet | None) -> ValidationSet | None:
    """The images of periodic evaluation (`data.val`), or None without them."""
    if val_shards is None:
        return None
    return load_validation_set(cfg.data, val_shards, cfg.model.image_size, cfg.train.eval_samples)


def pair_batches(
    cfg: Config, shards: ShardSet, engine: DeepSpeedEngine, rank: int, world_size: int, step: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's share of the training pairs from `step` on, in micro-batches."""
    loader = make_pair_loader(
        cfg.data,
        shards,
        cfg.model.image_size,
        engine.train_micro_batch_size_per_gpu(),
        rank=rank,
        world_size=world_size,
        seed=cfg.train.seed + step,
    )
    return iter(loader)


def restore(
    engine: DeepSpeedEngine, checkpoint: ray.train.Checkpoint | None, rank: int
) -> TrainState:
    """Where training starts: the checkpoint's state loaded into the engine, or step 0."""
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as folder:
        return restore_checkpoint(engine, Path(folder), rank)


def starting_checkpoint(cfg: Config, store: CheckpointStore) -> ray.train.Checkpoint | None:
    """`resume_checkpoint` as a Ray checkpoint. Ray offers, on a restart, the last checkpoint
    reported; the run's reporter marks it complete after Ray has registered it, so the store
    decides: an offer that is not complete (its upload or marker cut short) is passed over."""
    start = resume_checkpoint(store, cfg.train.resume)
    offered = ray.train.get_checkpoint()
    if offered is not None and (start is None or Path(offered.path).name != Path(start.path).name):
        logger.warning(
            "Ray offered %s to resume from, which is not the run's newest complete checkpoint; "
            "starting from %s instead",
            offered.path,
            start.path if start is not None else "scratch",
        )
    if start is None:
        return None
    return ray.train.Checkpoint(start.path, filesystem=start.filesystem)


def save_checkpoint(
    engine: Any,
    state: TrainState,
    cfg: Config,
    store: CheckpointStore,
    metrics: dict[str, Any],
    rank: int,
    world_size: int,
    pictures: dict[str, bytes],
) -> None:
    """Write this worker's part into a local temporary folder, then hand it to Ray, which
    uploads every worker's part into one folder of the store and registers it only once all
    of them are there. `pictures`: PNGs by TensorBoard tag, kept by rank 0."""
    with tempfile.TemporaryDirectory(prefix="ulm_checkpoint_") as name:
        folder = Path(name)
        write_checkpoint(folder, engine, state, cfg, rank, world_size, pictures)
        name = store.checkpoint_dir_name(state.step)
        # Ray uploads the folder within report(), through the store's filesystem.
        with store.named_errors(f"saving {name}"):
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=name,
            )


def inject_fault_once(store: CheckpointStore, step: int, rank: int, world_size: int) -> None:
    """`debug.fail_at_step`, for tests: the last worker dies as a crashed process would. A
    marker in the run folder keeps it from firing again after the restart or a rerun."""
    marker = f"fault_injected_at_step_{step}"
    if rank != world_size - 1 or store.exists(marker):
        return
    store.write_text(marker, f"worker {rank} exited on purpose after step {step}\n")
    # Wait until Ray has registered every report so far, so the run restarts from the last
    # checkpoint reported before this point and not, by a race, from an earlier one.
    ray.train.get_all_reported_checkpoints()
    os._exit(1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
