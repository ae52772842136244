"""The detector as an ONNX model, `detector.onnx`: runs with onnxruntime, no PyTorch needed.

Written by `python -m ulm_dist.export` from the same `torch.export` program as `detector.pt2`
(`torch.onnx.export`, the dynamo exporter, which needs onnx and onnxscript), at opset
`ONNX_OPSET`, with input `images` (batch, 3, S, S) RGB in [0, 1] and output `landmarks`
(batch, K, 2) (x, y) in [-1, 1]; the batch dimension is dynamic. Before it is kept, onnxruntime
runs it on random images of batch sizes it was not exported with, and its landmarks must agree
with PyTorch's within `ONNX_TOLERANCE`.

`OnnxProgram` runs it for `artifact.load_detector(folder, runtime="onnx")`: CPU provider, or
CUDA's first where onnxruntime has it (the onnxruntime-gpu package).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ulm_dist.extras import installed, require

ONNX_NAME = "detector.onnx"
# Opset 18: what the dynamo exporter writes natively for this model (no version conversion),
# and what onnxruntime has run since 1.14 (2023), so older runtimes load the file too.
ONNX_OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAME = "landmarks"
BATCH_NAME = "batch"
# Largest difference in normalised [-1, 1] units allowed between onnxruntime's landmarks and
# PyTorch's: its kernels sum in another order (float32), which moves a spatial-softmax mean
# by about 1e-7; 1e-4 is 0.0064 pixels of a 128-pixel image.
ONNX_TOLERANCE = 1e-4
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
EXPORT_EXTRA = ("onnx", "onnxscript", "onnxruntime")


class OnnxError(RuntimeError):
    """An ONNX model that cannot be written or loaded; says what to do."""


def can_export() -> bool:
    """Whether the `onnx` extra is installed, so that `write_onnx` can run."""
    return installed(*EXPORT_EXTRA)


def write_onnx(
    detector: nn.Module, program: torch.export.ExportedProgram, size: int, path: Path
) -> None:
    """Convert `program` (the export of `detector`, on S x S images) to ONNX at `path` and
    check it against `detector` with onnxruntime."""
    for module in EXPORT_EXTRA:
        require(module, "onnx", "writing detector.onnx")
    with quiet_exporter():
        onnx_program = torch.onnx.export(
            program,
            program.example_inputs[0],
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            verbose=False,
        )
    model = onnx_program.model_proto
    # The exporter names the dynamic batch dimension after its symbol (s0, s34, ...).
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_NAME
    path.write_bytes(model.SerializeToString())
    check_onnx(detector, OnnxProgram(path), size)


def check_onnx(detector: nn.Module, onnx_program: OnnxProgram, size: int) -> None:
    """onnxruntime must give PyTorch's landmarks at batch sizes the export did not see."""
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        images = torch.rand(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = detector(images)
        difference = (onnx_program(images) - expected).abs().max().item()
        if difference > ONNX_TOLERANCE:
            raise OnnxError(
                f"onnxruntime's landmarks differ from PyTorch's by {difference:.3g} (allowed "
                f"{ONNX_TOLERANCE}) at batch size {batch}; please report this with torch "
                f"{torch.__version__}, or export with --no-onnx"
            )


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter warns about torchvision ops it cannot register (not used here) and
    PyTorch's own deprecations: nothing a user of the export can act on."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        exporter_log.setLevel(level)


def available_providers() -> list[str]:
    ort = require("onnxruntime", "onnx", "running detector.onnx")
    return list(ort.get_available_providers())


class OnnxProgram:
    """detector.onnx in an onnxruntime session, called like the PyTorch program:
    images (B, 3, S, S) in [0, 1] -> landmarks (B, K, 2) in [-1, 1], on the CPU."""

    def __init__(self, path: Path, use_cuda: bool = False):
        ort = require("onnxruntime", "onnx", "running detector.onnx")
        errors = ort.capi.onnxruntime_pybind11_state
        providers = [CUDA_PROVIDER, CPU_PROVIDER] if use_cuda else [CPU_PROVIDER]
        if not path.is_file():
            raise OnnxError(
                f"{path}: no such file; the artifact was exported without ONNX (before ulm_dist "
                "wrote it, or with --no-onnx): export it again with `python -m ulm_dist.export`"
            )
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except (errors.Fail, errors.InvalidProtobuf, errors.InvalidGraph) as error:
            raise OnnxError(
                f"{path}: onnxruntime cannot load it as an ONNX model ({error}); the file is "
                "damaged or not from `python -m ulm_dist.export`: export the checkpoint again"
            ) from error
        self.providers = self.session.get_providers()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        (points,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        return torch.from_numpy(points)
