import os
import subprocess
import sys

import pytest
import torch
from s3_server import free_port

from ulm_dist.config import ConfigError, load_config
from ulm_dist.train.engine import check_precision, deepspeed_config, resolve_precision


def train_config(*overrides: str):
    return load_config(None, list(overrides)).train


def test_the_batch_splits_into_micro_batches_per_worker_and_accumulation_step():
    train = train_config("train.batch_size=24", "train.num_workers=3", "train.grad_accum_steps=2")
    config = deepspeed_config(train, world_size=3, precision="fp32")
    assert config["train_batch_size"] == 24
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_exactly_the_chosen_precision_is_enabled(precision):
    config = deepspeed_config(train_config(), world_size=2, precision=precision)
    assert config["bf16"]["enabled"] == (precision == "bf16")
    assert config["fp16"]["enabled"] == (precision == "fp16")
    assert config["fp16"]["loss_scale"] == 0  # dynamic loss scaling whenever fp16 is on


def test_zero_clipping_optimizer_and_schedule_come_from_the_train_config():
    train = train_config(
        "train.zero_stage=3",
        "train.grad_clip=0.5",
        "train.lr=0.01",
        "train.weight_decay=0.1",
        "train.steps=500",
        "train.warmup_steps=50",
    )
    config = deepspeed_config(train, world_size=2, precision="fp32")
    assert config["zero_optimization"] == {"stage": 3}
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["lr"] == 0.01
    assert config["optimizer"]["params"]["weight_decay"] == 0.1
    assert config["scheduler"]["params"]["warmup_num_steps"] == 50


def _learning_rates(schedule: str, at: list[int]) -> list[float]:
    """The learning rate DeepSpeed's own scheduler sets at each step in `at`, for the
    scheduler section `deepspeed_config` writes."""
    from deepspeed.runtime import lr_schedules

    train = train_config(
        "train.lr=0.01", "train.steps=500", "train.warmup_steps=50", f"train.lr_schedule={schedule}"
    )
    section = deepspeed_config(train, world_size=1, precision="fp32")["scheduler"]
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = getattr(lr_schedules, section["type"])(optimizer, **section["params"])
    rates = {}
    for step in range(max(at) + 1):
        rates[step] = optimizer.param_groups[0]["lr"]
        scheduler.step()
    return [rates[step] for step in at]


def test_constant_schedule_holds_the_rate_after_the_warm_up():
    early, warm, late = _learning_rates("constant", [10, 60, 480])
    assert early < 0.01 and warm == pytest.approx(0.01) and late == pytest.approx(0.01)


def test_cosine_schedule_decays_towards_zero_by_the_last_step():
    warm, middle, late = _learning_rates("cosine", [60, 275, 495])
    assert warm == pytest.approx(0.01, rel=0.02)
    assert 0.003 < middle < 0.007 and late < 0.0005


@pytest.mark.parametrize(
    ("requested", "on_gpu", "bf16_supported", "expected"),
    [
        ("auto", False, False, "fp32"),
        ("auto", True, True, "bf16"),
        ("auto", True, False, "fp32"),
        ("bf16", False, False, "bf16"),
        ("fp16", True, True, "fp16"),
    ],
)
def test_auto_precision_is_bf16_only_on_gpus_that_support_it(
    requested, on_gpu, bf16_supported, expected
):
    assert resolve_precision(requested, on_gpu, bf16_supported) == expected


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match=r"train\.precision: fp16 needs GPUs"):
        check_precision("fp16", on_gpu=False)
    check_precision("fp16", on_gpu=True)
    check_precision("bf16", on_gpu=False)


TRAINS_ONE_STEP = """
import sys, torch, torch.distributed as dist
from ulm_dist.config import load_config
from ulm_dist.models import build_learner
from ulm_dist.train.engine import build_engine, deepspeed_config
cfg = load_config(None, [*sys.argv[1:], "train.batch_size=2", "train.num_workers=1"])
dist.init_process_group("gloo")  # as Ray Train starts each worker's process group
engine = build_engine(build_learner(cfg.model, cfg.loss), deepspeed_config(cfg.train, 1, "fp32"))
losses = engine(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16))
engine.backward(losses["total"])
engine.step()
print("trained", float(losses["total"]))
"""


def test_training_on_cpu_needs_no_cpp_compiler(tmp_path, tiny_model_overrides):
    """DeepSpeed's CPU backend would compile a C++ op at start-up; the engine keeps it from
    doing so (`skip_shared_memory_all_reduce`), so a machine without a compiler trains."""
    env = {
        **os.environ,
        "CXX": "/bin/false",  # any compile fails, as on a machine without g++
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),  # nothing built before
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", TRAINS_ONE_STEP, *tiny_model_overrides],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained" in result.stdout
    assert not (tmp_path / "extensions").exists()
