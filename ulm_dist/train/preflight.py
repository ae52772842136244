"""What the driver checks and decides before any worker starts, so that a run that cannot
work stops at once with a message naming the setting, instead of failing on every worker
train.max_failures times over: the data (`data.train`, `data.val`; the synthetic set is
generated here), the ImageNet weights of an imagenet run, Ray, the device and the precision.
The train command (`driver.py`) and the sweep (`tune/sweep.py`) both call these.
"""

from __future__ import annotations

import logging
import time

import ray
import torch

from ulm_dist.config import Config, ConfigError
from ulm_dist.data import S3AccessError, ShardSet, prepare_shards
from ulm_dist.models.perceptual import PerceptualWeightsError, imagenet_vgg16_weights
from ulm_dist.train.engine import check_precision, resolve_precision


def start_ray(verbose: bool) -> None:
    """Join the cluster in RAY_ADDRESS (or start a local one) unless already connected."""
    if ray.is_initialized():
        return
    # Workers' own output (DeepSpeed, PyTorch warnings) stays in Ray's log files unless asked
    # for; progress comes from the reporter, and worker errors come back through fit().
    ray.init(
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
    )


def choose_device(cfg: Config, verbose: bool) -> bool:
    """Whether the workers train on GPUs (one each); asks the Ray cluster unless told CPU."""
    if cfg.train.device == "cpu":
        return False
    start_ray(verbose)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cfg.train.device == "auto" and gpus == 0:
        return False
    needed = cfg.train.num_workers
    if gpus < needed and cfg.train.gpu_wait_s > 0:
        gpus = wait_for_gpus(needed, cfg.train.gpu_wait_s)
    if gpus < needed:
        raise ConfigError(
            f"train.device: {needed} workers need one GPU each but the Ray cluster has {gpus}"
            + (f" after waiting {cfg.train.gpu_wait_s:g} s" if cfg.train.gpu_wait_s else "")
            + "; lower train.num_workers, add GPUs, raise train.gpu_wait_s for an autoscaling "
            "cluster, or set train.device=cpu"
        )
    return True


def wait_for_gpus(needed: int, timeout_s: float) -> int:
    """Ask the autoscaler for `needed` GPUs and wait for them: an autoscaling cluster starts
    with none, and Ray Train alone would wait forever without saying why."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * needed)
    deadline = time.monotonic() + timeout_s
    try:
        while (gpus := int(ray.cluster_resources().get("GPU", 0))) < needed:
            if time.monotonic() >= deadline:
                break
            print(f"waiting for GPU nodes: {gpus} of {needed} GPUs in the cluster", flush=True)
            time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))
    finally:
        # The request would hold the nodes after the run; the workers' own demand keeps them
        # while it lasts, and they take their GPUs within seconds, long before idle timeout.
        request_resources(bundles=[])
    return gpus


def choose_precision(cfg: Config, use_gpu: bool) -> str:
    bf16_supported = use_gpu and cfg.train.precision == "auto" and _gpu_supports_bf16()
    precision = resolve_precision(cfg.train.precision, use_gpu, bf16_supported)
    check_precision(precision, use_gpu)
    return precision


def _gpu_supports_bf16() -> bool:
    # Asked on a GPU worker node: the driver's node may have no GPU at all.
    probe = ray.remote(num_gpus=1)(torch.cuda.is_bf16_supported)
    return ray.get(probe.remote())


def prepare_data(cfg: Config) -> ShardSet:
    """The train shards; the synthetic set is generated into the cache on first use."""
    return checked_shards(cfg, cfg.data.train, "train", "data.train")


def prepare_val_data(cfg: Config) -> ShardSet | None:
    """The annotated shards of periodic evaluation (`data.val`), or None without them."""
    spec = cfg.data.val_spec()
    if spec is None:
        return None
    shards = checked_shards(cfg, spec, "val", "data.val")
    try:
        shards.require_landmarks(f"data.val={spec}", "periodic evaluation")
    except ValueError as error:
        raise ConfigError(f"{error}; or set data.val=null") from error
    return shards


def check_perceptual_weights(cfg: Config) -> None:
    """An imagenet run's VGG-16 weights, found (or downloaded once into the hub cache) on the
    driver before any worker starts: a missing file is a deterministic error to report at
    once, not a worker fault for Ray to retry."""
    if cfg.loss.perceptual != "imagenet" or cfg.loss.vgg_weights:
        return  # a given loss.vgg_weights file is checked with the config
    try:
        imagenet_vgg16_weights()
    except PerceptualWeightsError as error:
        raise ConfigError(f"loss.perceptual=imagenet: {error}") from error


def checked_shards(cfg: Config, spec: str, split: str, field: str) -> ShardSet:
    """The shards `spec` names, resolved on the driver before Ray starts. Data that is not
    there (an empty folder, a pattern matching no file) or a store that cannot be read (a
    missing bucket, an endpoint that does not answer) is a ConfigError naming `field`: on the
    workers it would fail every restart the same way, train.max_failures times over."""
    try:
        return prepare_shards(cfg.data, spec, split, image_size=cfg.model.image_size)
    except (FileNotFoundError, ValueError, S3AccessError) as error:
        raise ConfigError(f"{field}: {error}") from error
