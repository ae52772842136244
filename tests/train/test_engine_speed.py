"""`train.compile` and `train.channels_last` in the engine the workers train with
(`engine.build_engine`): a checkpoint of a compiled run resumes in an eager run and the
reverse, through the real checkpoint module; channels-last convolutions compute the same.

DeepSpeed runs in this process as a world of one (gloo), as on one worker. Compilation uses
the `aot_eager` backend (graph capture and AOTAutograd, no generated kernels: see
tests/models/test_compile.py for what that does and does not check); the worker compiles
the same way, only with `train.compile_backend`'s default, inductor.
"""

import os

import pytest
import torch
from s3_server import free_port
from torch import nn

from ulm_dist.config import load_config
from ulm_dist.models import build_learner
from ulm_dist.train.checkpoint import TrainState, restore_checkpoint, write_checkpoint
from ulm_dist.train.engine import (
    build_engine,
    convolutions_in_channels_last,
    deepspeed_config,
    skip_shared_memory_all_reduce,
)

TINY = [
    "model.image_size=16",
    "model.channels=[8,16]",
    "model.flow_channels=8",
    "model.appearance_dim=8",
    "model.num_landmarks=4",
    "loss.perceptual_layers=[pixels]",
    "train.batch_size=2",
    "train.num_workers=1",
    "train.warmup_steps=0",
]


@pytest.fixture(scope="module")
def one_worker():
    """A DeepSpeed world of one in this process, torn down after the module."""
    import deepspeed
    import torch.distributed as dist

    saved = {name: os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT", "RANK")}
    saved.update({name: os.environ.get(name) for name in ("LOCAL_RANK", "WORLD_SIZE")})
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0"
    )
    os.environ["WORLD_SIZE"] = "1"
    skip_shared_memory_all_reduce()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    yield
    dist.destroy_process_group()
    torch._dynamo.reset()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def engine(cfg, compiled: bool):
    torch.manual_seed(cfg.train.seed)
    learner = build_learner(cfg.model, cfg.loss)
    return build_engine(
        learner,
        deepspeed_config(cfg.train, 1, "fp32"),
        compile_backend="aot_eager" if compiled else None,
        channels_last=compiled,
    )


def train_one_step(engine) -> None:
    images = torch.rand(4, 3, 16, 16)
    engine.backward(engine(images[:2], images[2:])["total"])
    engine.step()


def assert_same_state(engine, other) -> None:
    state, expected = engine.module.state_dict(), other.module.state_dict()
    assert state.keys() == expected.keys()
    for name, value in state.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_compiled_and_eager_runs_resume_from_each_others_checkpoints(one_worker, tmp_path):
    cfg = load_config(None, [*TINY, "train.zero_stage=2"])
    compiled = engine(cfg, compiled=True)
    assert compiled.is_compiled
    train_one_step(compiled)
    write_checkpoint(tmp_path / "compiled", compiled, TrainState(step=1), cfg, 0, 1, {})

    eager = engine(cfg, compiled=False)
    assert restore_checkpoint(eager, tmp_path / "compiled", 0).step == 1
    assert_same_state(eager, compiled)
    train_one_step(eager)
    write_checkpoint(tmp_path / "eager", eager, TrainState(step=2), cfg, 0, 1, {})

    compiled_again = engine(cfg, compiled=True)
    assert restore_checkpoint(compiled_again, tmp_path / "eager", 0).step == 2
    assert_same_state(compiled_again, eager)
    # The optimizer state came along too: the next step is the eager run's next step.
    torch.manual_seed(7)
    train_one_step(compiled_again)
    torch.manual_seed(7)
    train_one_step(eager)
    for name, value in compiled_again.module.state_dict().items():
        # aot_eager's reordered float32 sums (tests/models/test_compile.py), through one Adam
        # step of lr 1e-3: far below the step itself.
        expected = eager.module.state_dict()[name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_channels_last_feeds_every_convolution_nhwc_and_computes_the_same():
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    plain = build_learner(cfg.model, cfg.loss)
    torch.manual_seed(0)
    nhwc = build_learner(cfg.model, cfg.loss)
    convolutions_in_channels_last(nhwc)
    layouts = []
    for conv in (m for m in nhwc.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_hook(
            lambda _, inputs, output: layouts.append(
                inputs[0].is_contiguous(memory_format=torch.channels_last)
                and output.is_contiguous(memory_format=torch.channels_last)
            )
        )
    images = torch.rand(4, 3, 16, 16)
    results = []
    for learner in (plain, nhwc):
        torch.manual_seed(1)  # the same random warps for both
        results.append(learner(images[:2], images[2:]))
    assert layouts and all(layouts)
    for name, value in results[0].items():
        # NHWC convolutions sum in another order: float32 rounding apart.
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
