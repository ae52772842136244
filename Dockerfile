# syntax=docker/dockerfile:1
#
# The image every node of a ulm_dist Ray cluster runs (cluster/aws.yaml): Ray, PyTorch with
# CUDA, DeepSpeed, the ImageNet VGG-16 weights of the perceptual loss, and this project.
#
#   docker build -t ulm-dist:0.1.0 .
#   docker run --rm --gpus all ulm-dist:0.1.0 python -c "import torch; print(torch.cuda.is_available())"
#
# docs/cluster.md has the push to a registry. Build arguments below (--build-arg NAME=value)
# pick other versions, GPU architectures, or pre-compiled DeepSpeed ops.
#
# Why Ray's image as the base rather than nvidia/cuda: the cluster launcher runs `ray start`
# inside this image on every node, so Ray must be there, at the version that `ray up` and
# `ray job submit` on your machine speak (the tests use 2.60.0). rayproject/ray also has what
# the launcher expects inside a container (bash, rsync, sudo, HOME), a non-root user `ray`,
# Python 3.11 in a conda environment that `ray` owns (so pip needs no root), on a CUDA
# *devel* base, whose nvcc DeepSpeed needs to compile ops. `-cu128` pins CUDA 12.8; the
# `-gpu` tag is an alias of Ray's default CUDA for that release.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# The versions the test suite runs (it uses the CPU build of the same torch); change them
# together with constraints/cpu.txt and the Ray version above.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ARG DEEPSPEED_VERSION=0.19.8
# DeepSpeed ops compiled into the image. 0 (default): none; ulm_dist uses none (torch's
# AdamW, no CPU offload), and anything that did would be compiled on first use by each
# worker. 1: every op that builds here, ~20 minutes and ~1 GB more; worth it once a config
# uses fused optimisers or offload. Selected ops instead: DS_BUILD_FUSED_ADAM=1 etc., added
# as build arguments here.
ARG DS_BUILD_OPS=0
# GPU architectures the ops are compiled for: A100 (8.0), A10G (8.6), L4 and L40S (8.9),
# H100 (9.0).
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
# torchvision's ImageNet VGG-16 (528 MB) for loss.perceptual=imagenet, put into PyTorch's hub
# cache where training looks for it; the hash in the file name is checked on download. Keep it
# equal to VGG16_URL in ulm_dist/models/perceptual.py. Empty: leave it out (an imagenet run
# then downloads it on each node at start, or fails where nodes have no internet; see README).
ARG VGG16_URL=https://download.pytorch.org/models/vgg16-397923af.pth

# Ray's images run as user `ray` (uid 1000, group `users`, gid 100), not root; stated here so
# that a different base cannot silently make it root.
USER 1000:100
WORKDIR /home/ray/ulm_dist
# TORCH_HOME holds PyTorch's hub cache: stated, so that the weights baked in below and the
# runs that read them agree on it whatever HOME a process has. Outside ~/.cache, which
# BuildKit may create as root for the pip cache mounts below.
ENV PYTHONUNBUFFERED=1 \
    TORCH_HOME=/home/ray/torch \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/home/ray/constraints.txt

# Each layer below changes less often than the next one, so an edit rebuilds only from its
# own layer on. pip's downloads go to a BuildKit cache, not into the image.

# 1. Versions no later install may change: Ray is the launcher's, torch and DeepSpeed are the
#    tested ones. PIP_CONSTRAINT applies this file to every pip call, in jobs' too.
RUN printf 'ray==%s\ntorch==%s\ndeepspeed==%s\n' \
        "$(python -c 'import ray; print(ray.__version__)')" "${TORCH_VERSION}" "${DEEPSPEED_VERSION}" \
        > /home/ray/constraints.txt

# 2. PyTorch for CUDA from PyTorch's index. The wheels bring their own CUDA runtime, cuDNN and
#    NCCL; the host needs only the NVIDIA driver (the Deep Learning AMI has it).
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 \
    pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==${TORCH_VERSION}"

# 3. DeepSpeed compiles against the installed torch, so it is built without build isolation
#    (which would fetch another torch), after the tools its build imports. Those tools are
#    left unpinned (DL3013): any recent version builds it, and the result does not depend on it.
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 \
    pip install setuptools wheel ninja py-cpuinfo packaging \
    && DS_BUILD_OPS="${DS_BUILD_OPS}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
        pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

# 4. The VGG-16 weights, into the hub cache: $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth,
#    where loss.perceptual=imagenet finds them (jobs/faces-128.yaml).
RUN if [ -n "${VGG16_URL}" ]; then \
        python -c "import sys, torch.hub; torch.hub.load_state_dict_from_url(sys.argv[1], check_hash=True, progress=False)" "${VGG16_URL}"; \
    fi

# 5. The project's dependencies, read from pyproject.toml alone: rebuilt when they change,
#    not on every source edit. (scripts/setup makes a .venv for development machines; here
#    the image's own Python is the environment, the one `ray start` runs in.) With the
#    extras a cluster job uses: datasets (prepare's MATLAB files), mlflow (train.tracking:
#    mlflow, written from the node that runs Ray Train's controller) and onnx (detector.onnx
#    in a sweep's export of its best trial). onnxruntime is the CPU build: predict runs on the CPU here unless
#    onnxruntime-gpu is installed in its place.
COPY --chown=ray:users pyproject.toml ./
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 \
    python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = project['optional-dependencies']; print(*project['dependencies'], *extras['mlflow'], *extras['onnx'], *extras['datasets'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 6. The project. A job's working_dir (ray job submit --working-dir .) comes first on its
#    sys.path, so a job runs the code it was submitted with; this copy serves jobs without
#    one, and `python -m ulm_dist.train --config jobs/...` in the container.
COPY --chown=ray:users README.md ./
COPY --chown=ray:users ulm_dist ./ulm_dist
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info
COPY --chown=ray:users jobs ./jobs
