"""Typed configuration: one dataclass tree, loaded from YAML plus `key=value` overrides.

Every field has a type, a default and a one-line meaning (`help`). Values are checked on
load; a wrong one is refused with its dotted name, what was expected and what was found.
A job YAML only states what differs from the defaults. `model.preset` picks a family of
model sizes (`tiny` for tests and CPU demos, `paper` for GPUs); fields given next to it
override the preset.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the field."""


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None):
    """A config field with its meaning and, for numbers, an allowed closed range."""
    meta = {"help": help, "min": min, "max": max}
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: Literal["cycle", "imm", "part"] = option(
        "cycle",
        "which landmark learner to train: cycle (Xu et al. 2020, unpaired pairs), imm "
        "(Jakab et al. 2018, conditional generation) or part (Lorenz et al. 2019, shape and "
        "appearance of parts); imm and part need data.pairs=warped",
    )
    preset: Literal["tiny", "paper"] = option(
        "tiny", "size family: tiny (32px, narrow; CPU) or paper (128px, Jakab et al. widths)"
    )
    image_size: int = option(32, "side of the square input images in pixels", min=16)
    num_landmarks: int = option(10, "K, the number of landmarks to discover", min=1)
    channels: list[int] = option(
        [16, 32, 64],
        "encoder widths, one per stage; each stage after the first halves the size",
        min=1,
    )
    appearance_dim: int = option(64, "width of each per-landmark appearance code", min=1)
    heatmap_std: float = option(
        0.1, "std of the rendered Gaussian landmark maps, in normalised [-1, 1] units", min=1e-3
    )
    norm: Literal["batch", "group"] = option(
        "batch",
        "normalisation in every conv block: batch (Jakab et al., Lorenz et al.; keeps each "
        "image's contrast) or group (per image, batch-independent; see models/networks.py)",
    )
    flow_channels: int = option(32, "feature width used by the cross-image flow module", min=1)
    flow_kernel: int = option(3, "side of each 2D kernel of the factorised 4D convolution", min=1)
    flow_temperature: float = option(
        0.05, "softmax temperature of the flow module's matching scores", min=1e-4
    )

    def validate(self) -> None:
        if not self.channels:
            raise ConfigError("model.channels: expected at least one stage, got []")
        stride = 2 ** (len(self.channels) - 1)
        if self.image_size % stride:
            raise ConfigError(
                f"model.image_size: {self.image_size} is not divisible by {stride}, "
                f"the total stride of {len(self.channels)} encoder stages"
            )
        if self.flow_kernel % 2 == 0:
            raise ConfigError(f"model.flow_kernel: expected an odd size, got {self.flow_kernel}")


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # Widths follow Jakab et al. 2018's encoder (32, 64, 128, 256 down to 16x16).
    "paper": {
        "image_size": 128,
        "channels": [32, 64, 128, 256],
        "appearance_dim": 256,
        "flow_channels": 128,
    },
}


# The VGG-16 layers loss.perceptual_layers may name: the ReLU after each convolution of
# torchvision's `vgg16().features`, relu<block>_<conv>, in order (models/perceptual.py builds
# the network from these names).
VGG16_LAYERS = tuple(
    f"relu{block}_{conv}"
    for block, convs in enumerate((2, 2, 3, 3, 3), 1)
    for conv in range(1, convs + 1)
)


@dataclass
class LossConfig:
    lambda_cycle: float = option(1.0, "weight of the perceptual cycle loss L_cycle", min=0)
    lambda_inv: float = option(1.0, "weight of the pose invariance loss L_inv", min=0)
    lambda_equiv: float = option(1.0, "weight of the flow equivariance loss L_equiv", min=0)
    lambda_recon: float = option(
        1.0,
        "weight of the reconstruction loss; for cycle the self-reconstruction P(I, D(a, p)) "
        "that bootstraps the bottleneck (not in Xu et al.; 0 gives their loss exactly, see "
        "models/cycle.py)",
        min=0,
    )
    recon_appearance: Literal["same", "transformed"] = option(
        "transformed",
        "cycle: where the self-reconstruction takes its appearance codes, from the image "
        "itself, D(a_i, p_i), or from a random warp of it as L_transform draws them, "
        "D(a(W(I_i)), p_i), so that the image's geometry reaches D only through p_i "
        "(see models/cycle.py)",
    )
    lambda_transform: float = option(
        5.0,
        "weight of the equivariance under random warps |E_p(W(x)) - W(E_p(x))|^2 (a similarity "
        "after loss.transform_deformation), every learner (Lorenz et al.'s 5 to "
        "reconstruction's 1; see models/priors.py)",
        min=0,
    )
    transform_deformation: float = option(
        0.05,
        "std of the smooth random deformation that L_transform adds to its similarities "
        "(shifts of a 4x4 control lattice, normalised units); 0: similarities only",
        min=0,
        max=0.2,
    )
    lambda_separation: float = option(
        1.0, "weight of the prior that keeps landmarks apart (see models/priors.py)", min=0
    )
    lambda_concentration: float = option(
        1.0,
        "weight of the concentration prior, the spread of each landmark's score map (Zhang et "
        "al. 2018; see models/priors.py)",
        min=0,
    )
    separation_std: float = option(
        0.15, "distance scale of the separation prior, in normalised [-1, 1] units", min=1e-3
    )
    consistency_warmup: int = option(
        500,
        "training forward passes over which lambda_inv and lambda_equiv ramp up from 0 "
        "(see models/cycle.py); 0 applies them in full from the start",
        min=0,
    )
    perceptual: Literal["pixels", "imagenet", "random"] = option(
        "pixels",
        "how reconstructions are compared: pixels (mean absolute difference, no download), "
        "imagenet (ImageNet VGG-16 features, as in the papers; weights from loss.vgg_weights "
        "or PyTorch's hub cache, downloaded once) or random (frozen random VGG-16 features); "
        "see models/perceptual.py",
    )
    vgg_weights: str | None = option(
        None,
        "imagenet only: a local torchvision VGG-16 state dict to use instead of the hub "
        "cache's copy (python -m ulm_dist.fetch_weights makes one)",
    )
    perceptual_layers: list[str] = option(
        ["pixels", "relu1_2", "relu2_2"],
        "imagenet and random only: the VGG-16 layers compared, plus raw pixels if listed",
    )
    lambda_edges: float = option(
        0.0,
        "weight of an edge term added to every perceptual distance: the mean absolute "
        "difference of the two images' neighbouring-pixel differences (see models/losses.py); "
        "0: off",
        min=0,
    )

    def validate(self) -> None:
        allowed = {"pixels", *VGG16_LAYERS}
        bad = [name for name in self.perceptual_layers if name not in allowed]
        if bad or not self.perceptual_layers:
            raise ConfigError(
                f"loss.perceptual_layers: unknown layers {bad or '[] (empty)'}; "
                f"choose from {sorted(allowed)}"
            )
        if self.perceptual != "pixels" and not set(self.perceptual_layers) & set(VGG16_LAYERS):
            raise ConfigError(
                f"loss.perceptual_layers: loss.perceptual={self.perceptual} compares VGG-16 "
                f"features, but {self.perceptual_layers} lists no VGG-16 layer; add one "
                "(e.g. relu1_2, relu2_2), or set loss.perceptual=pixels to compare pixels only"
            )
        if self.vgg_weights is not None and not Path(self.vgg_weights).is_file():
            raise ConfigError(f"loss.vgg_weights: no such file: {self.vgg_weights}")
        if self.vgg_weights is not None and self.perceptual != "imagenet":
            # Refused rather than ignored: a config that names weights expects them used.
            raise ConfigError(
                f"loss.vgg_weights: used only with loss.perceptual=imagenet, got "
                f"loss.perceptual={self.perceptual}; set loss.perceptual=imagenet to use "
                f"{self.vgg_weights}, or drop loss.vgg_weights"
            )


@dataclass
class DataConfig:
    train: str = option(
        "synthetic", "train shards: a folder, a shard pattern, s3://bucket/prefix, or 'synthetic'"
    )
    val: str | None = option(
        "auto",
        "annotated shards for periodic evaluation, named as data.train (the 'val' split of a "
        "data set root); auto: the synthetic val split when data.train is synthetic, else none; "
        "null: none",
    )
    cache_dir: str = option(".cache/ulm_dist", "where the synthetic set is generated on first use")
    synthetic_samples: int = option(
        20000,
        "size of the generated synthetic train split (generated once, about 30 s at 32 px); "
        "fewer images let the detector fit the set rather than the creature",
        min=16,
    )
    num_workers: int = option(1, "data-loader worker processes per training worker", min=0)
    shuffle_buffer: int = option(256, "samples held for shuffling within shards", min=1)
    s3_endpoint_url: str | None = option(None, "endpoint for S3-compatible stores (None: AWS)")
    s3_max_attempts: int = option(
        5, "tries per S3 request before giving up, with exponential backoff between", min=1
    )
    synthetic_seed: int = option(
        0, "seed of the synthetic set (not train.seed: runs compare on the same data)"
    )
    pairs: Literal["unpaired", "warped"] = option(
        "unpaired",
        "image_j of a pair: another image (unpaired) or a TPS/affine warp of image_i (warped, "
        "for the conditional-generation baseline)",
    )
    flip_probability: float = option(
        0.0,
        "chance of a horizontal flip per view; landmarks follow the manifest's flip permutation",
        min=0,
        max=1,
    )
    crop_scale: float = option(
        0.85,
        "smallest random square crop, as a fraction of the image side (1: no crop)",
        min=0.1,
        max=1,
    )
    brightness: float = option(0.2, "colour jitter: brightness factor in 1 +- this", min=0, max=1)
    contrast: float = option(0.2, "colour jitter: contrast factor in 1 +- this", min=0, max=1)
    saturation: float = option(0.2, "colour jitter: saturation factor in 1 +- this", min=0, max=1)
    hue: float = option(0.05, "colour jitter: hue rotation in +- this many turns", min=0, max=0.5)
    warp_rotation_deg: float = option(
        5.0, "warped pairs: std of the rotation in degrees (Jakab et al. 2018)", min=0
    )
    warp_scale_std: float = option(0.1, "warped pairs: std of the log scale", min=0)
    warp_translation_std: float = option(
        0.1, "warped pairs: std of the shift, in half image widths", min=0
    )
    warp_tps_std: float = option(
        0.05, "warped pairs: std of the TPS control-point shifts, in half image widths", min=0
    )

    def val_spec(self) -> str | None:
        """`val` with auto made concrete. The synthetic set is only a fair yardstick for a
        model trained on it, and it lives on the driver's disk, which workers reading
        data.train from S3 on other nodes may not see."""
        if self.val == "auto":
            return "synthetic" if self.train == "synthetic" else None
        return self.val


@dataclass
class TrainConfig:
    run_name: str = option("demo", "run name; checkpoints go to <storage>/<run_name>")
    storage: str = option(
        "runs",
        "checkpoint store: a local folder or s3://bucket/prefix (endpoint: data.s3_endpoint_url)",
    )
    seed: int = option(0, "global random seed")
    steps: int = option(300, "optimizer steps to train for", min=1)
    batch_size: int = option(16, "image pairs per optimizer step, summed over workers", min=1)
    lr: float = option(1e-3, "peak learning rate (Adam)", min=0)
    weight_decay: float = option(1e-5, "AdamW weight decay", min=0)
    lr_schedule: Literal["constant", "cosine"] = option(
        "constant",
        "after the warm-up: hold train.lr (as Jakab et al.) or decay it to 0 by train.steps",
    )
    warmup_steps: int = option(20, "linear learning-rate warm-up from 0 to train.lr", min=0)
    grad_clip: float = option(1.0, "gradient-norm clipping threshold (0 disables)", min=0)
    log_every: int = option(10, "steps between progress lines", min=1)
    num_workers: int = option(2, "Ray Train workers: one process (and one GPU on GPUs) each", min=1)
    device: Literal["auto", "cpu", "gpu"] = option(
        "auto", "where workers train; auto: GPUs if the Ray cluster has any, else CPU"
    )
    gpu_wait_s: float = option(
        0,
        "device=gpu on an autoscaling cluster: seconds to wait for the GPU nodes asked for to "
        "join before giving up (0: fail at once if the GPUs are not there)",
        min=0,
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto",
        "auto: bf16 on GPUs that support it, else fp32; fp16 (GPUs only) uses dynamic loss scaling",
    )
    zero_stage: int = option(
        2,
        "DeepSpeed ZeRO stage: 0 off, 1 shards optimizer state, 2 +gradients, 3 +weights",
        min=0,
        max=3,
    )
    grad_accum_steps: int = option(1, "micro-batches accumulated into each optimizer step", min=1)
    checkpoint_every: int = option(
        100, "steps between checkpoints; the last step always gets one", min=1
    )
    eval_every: int | None = option(
        None,
        "steps between evaluations on data.val (the val/ metrics); null: at every checkpoint; "
        "the last step always gets one",
        min=1,
    )
    eval_samples: int = option(
        256,
        "data.val images per evaluation: the linear regressor is fit on the first half and "
        "scored on the second",
        min=2,
    )
    keep_checkpoints: int = option(
        2, "newest checkpoints kept in the store; older ones are deleted", min=1
    )
    resume: str = option(
        "auto",
        "auto: continue this run from its latest checkpoint, if any; never: refuse to start if "
        "the run has checkpoints; or a checkpoint path to start from while the run has none",
    )
    max_failures: int = option(
        2, "worker-group failures survived by restarting from the latest checkpoint", min=0
    )
    log_dir: str = option(
        "runs", "local folder for metrics.jsonl and TensorBoard events: <log_dir>/<run_name>"
    )
    tracking: Literal["none", "mlflow"] = option(
        "none",
        "experiment tracking besides metrics.jsonl and TensorBoard: none, or mlflow (the "
        "resolved config as params, the metrics of every report, evaluation sheets and the "
        "summary as artifacts; pip install 'ulm-dist[mlflow]'; see train/tracking.py)",
    )
    tracking_uri: str | None = option(
        None,
        "tracking=mlflow: the tracking server or store (http://host:5000, sqlite:///mlflow.db, "
        "a folder); null: MLflow's own default (MLFLOW_TRACKING_URI, else its local store)",
    )
    tracking_experiment: str = option(
        "ulm_dist", "tracking=mlflow: the experiment the run is recorded in, created if missing"
    )
    time_collectives: bool = option(
        False,
        "time DeepSpeed's collectives and count their bytes (the time/collectives_s and "
        "comm/collective_mb metrics) with its comms logger, "
        "which waits for each one to finish: on GPUs communication then stops overlapping "
        "with compute, so leave it off outside benchmarks",
    )
    compile: bool = option(
        False,
        "torch.compile the learner (its forward and backward) with train.compile_backend; off "
        "by default: no GPU measurement shows yet that it pays for its compile time "
        "(BENCHMARKS.md, GPU speed)",
    )
    compile_backend: Literal["inductor", "aot_eager"] = option(
        "inductor",
        "train.compile's backend: inductor generates fused kernels; aot_eager only captures "
        "the graphs and runs them op by op (no code generation), to debug a compile problem",
    )
    channels_last: bool = option(
        False,
        "run every convolution on channels-last (NHWC) activations, the layout of GPU tensor "
        "cores; off by default until measured on a GPU (BENCHMARKS.md, GPU speed)",
    )

    def validate(self) -> None:
        check_folder_name(self.run_name, "train.run_name")
        shares = self.num_workers * self.grad_accum_steps
        if self.batch_size % shares:
            raise ConfigError(
                f"train.batch_size: {self.batch_size} pairs per step do not split evenly into "
                f"{self.num_workers} workers x {self.grad_accum_steps} accumulation steps; "
                f"use a multiple of {shares} or change train.num_workers/train.grad_accum_steps"
            )
        if not self.resume:
            raise ConfigError("train.resume: expected auto, never or a checkpoint path, got ''")
        if self.tracking == "none" and self.tracking_uri is not None:
            # Refused rather than ignored: a config that names a tracking server expects it used.
            raise ConfigError(
                f"train.tracking_uri: set to {self.tracking_uri!r}, but train.tracking is none; "
                "set train.tracking=mlflow to record the run there, or drop train.tracking_uri"
            )
        if not self.tracking_experiment.strip():
            raise ConfigError("train.tracking_experiment: expected an experiment name, got ''")


@dataclass
class DebugConfig:
    """Switches for tests and debugging, not for training runs."""

    fail_at_step: int | None = option(
        None,
        "fault injection: the last worker exits once, after this step's reports are "
        "registered (a marker in the run folder stops it firing again)",
        min=1,
    )


# Keys that moved, by their old dotted name: a config naming one is refused with the new
# name; a saved one is read at the new place (deploy/trained.py).
MOVED_KEYS = {"train.fail_at_step": "debug.fail_at_step"}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> None:
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if hasattr(value, "validate"):
                value.validate()
        if self.model.name in ("imm", "part") and self.data.pairs != "warped":
            raise ConfigError(
                f"data.pairs: model.name={self.model.name} learns from an image and a warped "
                f"copy of it; set data.pairs=warped (got {self.data.pairs})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `section.key=value` overrides."""
    raw = {} if path is None else read_yaml_mapping(path, "sections")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = parse_yaml(value, f"override {item!r}")
    return config_from_dict(raw)


def read_yaml_mapping(path: str | Path, contents: str) -> dict[str, Any]:
    """The mapping in the YAML file at `path` (`contents` says what it maps, for errors).
    A file that cannot be read is a ConfigError naming it, so that a command exits with one
    line instead of a traceback."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: no such file; expected a YAML file, check the path") from error
    except IsADirectoryError as error:
        raise ConfigError(
            f"{path}: expected a YAML file, got a folder; name one of the files in it"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read it as a YAML text file: {error}") from error
    raw = parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of {contents}, got {type(raw).__name__}")
    return raw


def parse_yaml(text: str, source: str) -> Any:
    """`text` parsed as YAML; a syntax error is a ConfigError naming `source` and, as PyYAML's
    own message does not (it says "<unicode string>"), the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({error.context})" if error.context else ""
        raise ConfigError(
            f"{source}: invalid YAML{where}: {error.problem}{context}; fix the syntax there"
        ) from error
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"{source}: invalid YAML: {first_line}; fix the syntax there") from error


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    model_raw = raw.get("model")
    if isinstance(model_raw, dict):
        preset = model_raw.get("preset", ModelConfig.preset)
        if preset not in MODEL_PRESETS:
            raise ConfigError(
                f"model.preset: expected one of {sorted(MODEL_PRESETS)}, got {preset!r}"
            )
        raw["model"] = {**MODEL_PRESETS[preset], **model_raw}
    config = build_section(Config, raw, "")
    config.validate()
    return config


def build_section(cls: type, raw: Any, path: str) -> Any:
    """A config dataclass `cls` from `raw`, every field coerced and checked; errors name the
    field as `path.field` (other typed configs, such as the sweep's, are built the same way)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        moved = MOVED_KEYS.get(f"{where}{unknown[0]}")
        if moved is not None:
            raise ConfigError(f"{where}{unknown[0]}: moved to {moved}; set that instead")
        raise ConfigError(
            f"unknown config key {where}{unknown[0]}; known keys here: {sorted(known)}"
        )
    values = {}
    for name, value in raw.items():
        dotted = f"{path}.{name}" if path else name
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = build_section(kind, value, dotted)
        else:
            values[name] = _coerce(kind, value, dotted)
            _check_range(known[name], values[name], dotted)
    return cls(**values)


def _coerce(kind: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        # PyYAML reads YAML 1.1, where an exponent without a dot (2e-3) is a string, not a
        # number; people write learning rates that way.
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected float, got {value!r}") from None
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        # YAML's .nan and .inf are floats, but no field has a use for them: a NaN learning rate
        # or heatmap width would only turn the first step's loss into NaN.
        raise ConfigError(f"{path}: expected a finite number, got {value}")
    return value


def check_folder_name(name: str, path: str) -> None:
    """Refuse a name that is not one plain folder: it is joined to a storage path, where a
    separator or '..' would put the folder elsewhere and '' or '.' would be the storage itself."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ConfigError(
            f"{path}: expected a plain folder name (not '', '.' or '..', without '/' or '\\'), "
            f"got {name!r}"
        )


def _check_range(spec: dataclasses.Field, value: Any, path: str) -> None:
    low, high = spec.metadata.get("min"), spec.metadata.get("max")
    values = value if isinstance(value, list) else [value]
    for item in values:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if low is not None and item < low:
            raise ConfigError(f"{path}: must be >= {low}, got {item}")
        if high is not None and item > high:
            raise ConfigError(f"{path}: must be <= {high}, got {item}")
