"""DeepSpeed wiring: our `TrainConfig` -> a DeepSpeed config, and the engine around a learner
(what a checkpoint holds of it is in `checkpoint.py`).

This is the one place that knows the ZeRO stage and the precision, and how the learner runs
inside the engine: compiled or not (`train.compile`), its convolutions channels-last or not
(`train.channels_last`). The training loop only calls the engine (`engine(...)`, `backward`,
`step`) and the helpers here, so it reads the same whether the state is sharded or compiled.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ulm_dist.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

logger = logging.getLogger(__name__)

# DeepSpeed's own progress prints ("step=..., lr=...") would duplicate ours.
_NEVER = 2**31 - 1


def resolve_precision(requested: str, on_gpu: bool, bf16_supported: bool) -> str:
    """`train.precision` with `auto` made concrete for the hardware the workers run on."""
    if requested != "auto":
        return requested
    # bf16 keeps fp32's exponent range, so it needs no loss scaling. CPUs without bf16
    # instructions (AMX, AVX512-BF16) train it many times slower, so auto keeps CPUs on fp32.
    return "bf16" if on_gpu and bf16_supported else "fp32"


def check_precision(precision: str, on_gpu: bool) -> None:
    if precision == "fp16" and not on_gpu:
        raise ConfigError(
            "train.precision: fp16 needs GPUs (its loss scaling and kernels are CUDA-only), "
            "but this run trains on CPU; use fp32 or bf16 on CPU, or train.device=gpu on a "
            "Ray cluster with GPUs"
        )


def deepspeed_config(train: TrainConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config for `train` on `world_size` data-parallel workers."""
    micro_batch = train.batch_size // (world_size * train.grad_accum_steps)
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0 selects dynamic loss scaling: start at 2^16, halve on overflow (and skip
        # that step), double after 1000 clean steps.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW instead of DeepSpeed's fused kernels: those are compiled on first
            # use, need a CUDA toolchain on GPUs and do not exist for CPUs.
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True},
        },
        "scheduler": lr_scheduler(train),
        "steps_per_print": _NEVER,
        # DeepSpeed's own timing of each collective, read by `meters.DeepSpeedCollectives`.
        "comms_logger": {"enabled": train.time_collectives, "prof_all": True, "verbose": False},
    }


def lr_scheduler(train: TrainConfig) -> dict[str, Any]:
    """DeepSpeed's scheduler section for `train.lr_schedule`."""
    # DeepSpeed needs at least one warm-up step.
    warmup = {"warmup_num_steps": max(1, train.warmup_steps), "warmup_type": "linear"}
    if train.lr_schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {"total_num_steps": train.steps, **warmup}}
    return {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr, **warmup},
    }


def build_engine(
    learner: nn.Module,
    config: dict[str, Any],
    *,
    compile_backend: str | None = None,
    channels_last: bool = False,
) -> DeepSpeedEngine:
    """Wrap `learner`; only its trainable parameters reach the optimizer.

    The frozen perceptual network stays out of the optimizer (no Adam state for it); under
    ZeRO-3 its weights are still partitioned and gathered like the others'.

    `compile_backend` (None: eager) compiles the learner in place, through DeepSpeed's
    `engine.compile`, which calls `module.compile`: the learner's state-dict keys stay its
    own (`torch.compile(learner)` would prefix them with `_orig_mod.`), so checkpoints of
    compiled and eager runs load into each other. `channels_last`: see
    `convolutions_in_channels_last`.
    """
    # Imported on use: the driver imports this module but never trains, and importing
    # DeepSpeed probes for an accelerator (and warns on CPU-only machines).
    import deepspeed

    skip_shared_memory_all_reduce()
    if channels_last:
        convolutions_in_channels_last(learner)
    trainable = [parameter for parameter in learner.parameters() if parameter.requires_grad]
    engine, *_ = deepspeed.initialize(model=learner, model_parameters=trainable, config=config)
    if compile_backend is not None:
        if engine.zero_optimization_partition_weights():
            logger.warning(
                "train.compile at ZeRO-3: DeepSpeed's parameter gathering runs in hooks that "
                "break the compiled graph at every layer, and each layer is compiled again "
                "(on CPU a step took 15-30 times as long as a compiled one without ZeRO-3; "
                "BENCHMARKS.md, GPU speed)"
            )
        engine.compile(backend=compile_backend)
    return engine


def skip_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce when it starts.

    On CPU, DeepSpeed's communication backend builds that C++ op (g++, 35 s on 2 cores, once
    per machine and again whenever the virtualenv's path changes) before anything trains,
    and a machine without a working C++ compiler fails right there. The op serves only
    `inference_all_reduce` (tensor-parallel inference), and only with `LOCAL_SIZE` set;
    training's collectives go through torch.distributed either way. Marking it incompatible
    is what DeepSpeed does itself on platforms where it cannot be built. Call it before
    DeepSpeed starts its backend (`build_engine` does)."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def convolutions_in_channels_last(learner: nn.Module) -> None:
    """Hand every 2D convolution of `learner` its input channels-last (NHWC), so that it runs,
    and returns its output, in that layout whatever the weights' layout.

    The weights themselves cannot be channels-last here: DeepSpeed broadcasts and flattens
    parameters as contiguous buffers (a channels-last weight fails its broadcast), so each
    convolution converts its weight, a small tensor next to the activations, on the fly.
    The input is converted per convolution rather than once for the images because the
    concatenations with rendered heatmaps (NCHW) in between would turn it back.
    """
    for module in learner.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(_channels_last_input)


def _channels_last_input(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
    (images,) = inputs
    return (images.contiguous(memory_format=torch.channels_last),)


def input_dtype(engine: DeepSpeedEngine) -> torch.dtype:
    """The dtype the engine's weights are in, which its inputs must match."""
    model_dtype, _ = engine.get_data_types()
    return model_dtype
