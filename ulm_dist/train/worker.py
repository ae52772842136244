"""What each Ray Train worker runs: `train_func(config)`.

Each worker builds the learner and its DeepSpeed engine (`engine.py`), streams its share of
the shards and trains to `train.steps`. Every `train.log_every` steps it reports run-wide
metrics with `ray.train.report`; every `train.checkpoint_every` steps, and at the last step,
it reports a checkpoint too. With `data.val`, every `train.eval_every` steps (and at the last
step) it adds the `val/` landmark-regression metrics to that step's report and, on checkpoint
steps, the pictures to the checkpoint (`validation.py`). It starts from the run's newest
complete checkpoint in the store (a restart after a worker failure, or a rerun of the same
run), else from `train.resume` if that names a checkpoint (`resume_checkpoint`); Ray's own
`ray.train.get_checkpoint()` is only taken when it is that checkpoint.

A checkpoint holds the engine's state (weights, optimizer and LR schedule, sharded as the
engine shards them), each worker's RNG states, `train_state.json` (step, samples seen,
skipped samples, the resolved config with URL credentials redacted) and, when the step was
evaluated, the val pictures.
The data stream restarts at every checkpoint, seeded with `train.seed + step`, so the step is
also the stream position: a resumed run sees exactly the batches an uninterrupted run sees,
without replaying what came before.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from ulm_dist.config import Config, config_from_dict
from ulm_dist.data import make_pair_loader
from ulm_dist.evaluate.periodic import load_validation_set, validate
from ulm_dist.models import build_learner
from ulm_dist.storage import s3_options
from ulm_dist.train.checkpoint import (
    CheckpointStore,
    TrainState,
    restore_checkpoint,
    resume_checkpoint,
    write_checkpoint,
)
from ulm_dist.train.engine import (
    build_engine,
    collective_bytes,
    collective_seconds,
    deepspeed_config,
    input_dtype,
    reset_collective_log,
)

logger = logging.getLogger(__name__)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point; `config` is what `train.py` puts together."""
    cfg = config_from_dict(config["config"])
    train = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    store = CheckpointStore(train.storage, train.run_name, s3_options(cfg.data))

    # The same seed everywhere gives every worker the same initial weights.
    seed_everything(train.seed)
    learner = build_learner(cfg.model, cfg.loss)
    engine = build_engine(learner, deepspeed_config(train, world_size, config["precision"]))
    validation = None
    if config["val_shards"] is not None:
        # Loaded before the per-worker seeding below: starting a DataLoader draws from the
        # global RNG, and here that draw cannot change what training sees after a resume.
        validation = load_validation_set(
            cfg.data, config["val_shards"], cfg.model.image_size, train.eval_samples
        )
    eval_every = train.eval_every or train.checkpoint_every
    # From here on each worker draws its own random numbers.
    seed_everything(train.seed + 1 + rank)
    state = TrainState()
    checkpoint = starting_checkpoint(cfg, store)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = restore_checkpoint(engine, Path(folder), rank)

    dtype = input_dtype(engine)
    micro_batch = engine.train_micro_batch_size_per_gpu()
    meter = IntervalMeter(engine.device, train.time_collectives)
    batches = None
    while state.step < train.steps:
        if batches is None:
            loader = make_pair_loader(
                cfg.data,
                config["shards"],
                cfg.model.image_size,
                micro_batch,
                rank=rank,
                world_size=world_size,
                seed=train.seed + state.step,
            )
            batches = iter(loader)
        for _ in range(train.grad_accum_steps):
            started = time.perf_counter()
            batch = next(batches)
            data_wait = time.perf_counter() - started
            if train.time_collectives:
                reset_collective_log()  # count only the collectives of this micro-batch
            marks = [meter.mark()]
            image_i = batch["image_i"].to(engine.device, dtype, non_blocking=True)
            image_j = batch["image_j"].to(engine.device, dtype, non_blocking=True)
            losses = engine(image_i, image_j)
            marks.append(meter.mark())
            engine.backward(losses["total"])
            marks.append(meter.mark())
            engine.step()
            marks.append(meter.mark())
            meter.add_micro_batch(
                losses,
                pairs=len(image_i),
                skipped=int(batch["skipped"].sum()),
                data_wait=data_wait,
                phase_marks=marks,
                collectives=collective_seconds() if train.time_collectives else 0.0,
                collective_bytes=sum(collective_bytes().values()) if train.time_collectives else 0,
            )
        meter.end_step()
        state.step += 1
        state.samples_seen += train.batch_size

        last = state.step == train.steps
        checkpoint_due = state.step % train.checkpoint_every == 0 or last
        eval_due = validation is not None and (state.step % eval_every == 0 or last)
        if checkpoint_due or eval_due or state.step % train.log_every == 0:
            metrics = meter.flush(world_size)
            state.skipped_total += metrics["data/skipped"]
            metrics["data/skipped_total"] = state.skipped_total
            metrics.update(step=state.step, samples_seen=state.samples_seen, lr=engine.get_lr()[0])
            pictures = {}
            if eval_due:
                # Collective under ZeRO-3: every worker evaluates at the same steps.
                scores, pictures = validate(engine.module, validation, engine.device, dtype)
                metrics.update(scores)
            if checkpoint_due:
                save_checkpoint(engine, state, cfg, store, metrics, rank, world_size, pictures)
                # Restart the stream at the step, as a resumed run would (see module doc).
                batches = None
            else:
                ray.train.report(metrics)
        if state.step == train.fail_at_step:
            inject_fault_once(store, state.step, rank, world_size)


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


# What a micro-batch's `phase_marks` bound, in order: marks[k] to marks[k + 1] is PHASES[k].
PHASES = ("forward", "backward", "optimizer")
Mark = float | torch.cuda.Event


class IntervalMeter:
    """Sums what happens on this worker between two reports; `flush` turns the sums into
    run-wide metrics (a collective: every worker calls it at the same step).

    The step time is split into data wait (host time in `next(batches)`), the `PHASES` and,
    with `time_collectives`, the time DeepSpeed's collectives took within those phases
    (waiting for the slowest worker included) and the bytes handed to them."""

    def __init__(self, device: torch.device, time_collectives: bool = False):
        self.device = device
        self.time_collectives = time_collectives
        self._reset()

    def _reset(self) -> None:
        # Wall time of the whole interval: steps, and the reports and checkpoints in between.
        self.started = time.perf_counter()
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.steps = 0
        self.pairs = 0
        self.skipped = 0
        self.data_wait = 0.0
        self.phase_marks: list[list[Mark]] = []
        self.collectives = 0.0
        self.collective_bytes = 0

    def mark(self) -> Mark:
        """A point in the step's work. On CUDA it is an event that the GPU passes when it gets
        there, read only at `flush`, so timing adds no synchronisation; on a CPU each kernel
        has finished when its call returns, and the wall clock is exact."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add_micro_batch(
        self,
        losses: dict[str, torch.Tensor],
        *,
        pairs: int,
        skipped: int,
        data_wait: float,
        phase_marks: list[Mark],
        collectives: float = 0.0,
        collective_bytes: int = 0,
    ) -> None:
        for name, value in losses.items():
            # Summed on the device: reading a value every step would stall a GPU's queue.
            self.loss_sums[name] = self.loss_sums.get(name, 0) + value.detach().float()
        self.micro_batches += 1
        self.pairs += pairs
        self.skipped += skipped
        self.data_wait += data_wait
        self.phase_marks.append(phase_marks)
        self.collectives += collectives
        self.collective_bytes += collective_bytes

    def end_step(self) -> None:
        self.steps += 1

    def phase_seconds(self) -> list[float]:
        """Seconds spent in each of `PHASES`, summed over the interval's micro-batches."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return [
            sum(seconds_between(marks[k], marks[k + 1]) for marks in self.phase_marks)
            for k in range(len(PHASES))
        ]

    def flush(self, world_size: int) -> dict[str, float | int]:
        names = sorted(self.loss_sums)
        losses = torch.stack([self.loss_sums[name] for name in names]) / self.micro_batches
        wall = time.perf_counter() - self.started
        # Seconds, then megabytes, per step.
        totals = [
            wall,
            self.data_wait,
            *self.phase_seconds(),
            self.collectives,
            self.collective_bytes / 1e6,
        ]
        counters = torch.tensor(
            [*(total / self.steps for total in totals), self.pairs / wall, self.skipped]
        )
        summed = torch.cat([losses.to(self.device), counters.to(self.device)])
        dist.all_reduce(summed)
        values = summed.tolist()
        loss_sums = values[: len(names)]
        step_time, data_wait, *phases, collectives, collective_mb, pairs_per_s, skipped = values[
            len(names) :
        ]
        metrics: dict[str, float | int] = {
            f"loss/{name}": value / world_size for name, value in zip(names, loss_sums, strict=True)
        }
        metrics.update(
            {
                "time/step_s": step_time / world_size,
                "time/data_wait_s": data_wait / world_size,
                **{
                    f"time/{phase}_s": seconds / world_size
                    for phase, seconds in zip(PHASES, phases, strict=True)
                },
                "throughput/pairs_per_s": pairs_per_s,
                "throughput/pairs_per_s_per_worker": pairs_per_s / world_size,
                "data/skipped": round(skipped),
            }
        )
        if self.time_collectives:
            metrics["time/collectives_s"] = collectives / world_size
            metrics["comm/collective_mb"] = collective_mb / world_size
        metrics.update(peak_memory_mib(self.device))
        self._reset()
        return metrics


def seconds_between(begin: Mark, end: Mark) -> float:
    if isinstance(begin, torch.cuda.Event):
        return begin.elapsed_time(end) / 1e3  # CUDA events measure milliseconds
    return end - begin


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """The largest worker's peaks so far, in MiB (a collective): resident memory of the worker
    process (its data-loader processes are not counted) and, on CUDA, the tensors allocated
    on its GPU. Both come from counters the OS and the allocator keep, read at reports only."""
    # ru_maxrss is in KiB on Linux.
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10]
    if device.type == "cuda":
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    largest = torch.tensor(peaks, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    names = ("memory/peak_rss_mib", "memory/peak_gpu_mib")
    return dict(zip(names, largest.tolist(), strict=False))


def inject_fault_once(store: CheckpointStore, step: int, rank: int, world_size: int) -> None:
    """`train.fail_at_step`, for tests: the last worker dies as a crashed process would. A
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
