import pytest

from ulm_dist.config import ConfigError, load_config
from ulm_dist.engine import check_precision, deepspeed_config, resolve_precision


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
    schedule = config["scheduler"]
    assert schedule["type"] == "WarmupCosineLR"
    assert schedule["params"]["total_num_steps"] == 500
    assert schedule["params"]["warmup_num_steps"] == 50
    assert schedule["params"]["warmup_type"] == "linear"


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
