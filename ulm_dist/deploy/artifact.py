"""An exported detector: a folder that runs with PyTorch alone, no Ray, DeepSpeed or checkpoint.

    detector = load_detector("exports/demo")     # written by `python -m ulm_dist.export`
    detector = load_detector("exports/demo", runtime="onnx")     # detector.onnx, onnxruntime
    points = detector(images)    # images (B, 3, S, S) RGB in [0, 1] -> (B, K, 2) pixels (x, y)
    annotated = detector.regress(points)         # (B, L, 2) pixels, if the folder has a regressor

The folder holds:
    detector.pt2     the pose encoder as a `torch.export` program: images -> landmarks in [-1, 1]
    detector.onnx    the same as an ONNX model, for onnxruntime (`onnx_detector.py`), unless
                     exported with --no-onnx
    model.pt         the state dict of the whole model (`model.name`'s, torch.save), to fine-tune
    config.yaml      the run's resolved config
    metadata.json    source checkpoint, step, image size S, K, validation metrics
    regressor.json   optional: the linear map from the K discovered to L annotated landmarks
    README.md        how to use it without this package, and what it scored

Pixel coordinates are those of the S x S input, continuous, the image spanning [0, S] (pixel
i's centre at i + 0.5): the convention of `ulm_dist.evaluate`, whose regressor maps them.

Why `torch.export` and not TorchScript: `torch.jit.trace` is deprecated (recent PyTorch warns
on every call), `torch.jit.script` cannot compile the encoder (its forward calls super()), and
a trace bakes the tracing device into the spatial softmax's coordinate grid (`torch.arange`),
so a CPU trace fails on a GPU. An exported program bakes it in too, but `move_to_device_pass`
rewrites those constants, and the batch dimension is exported as dynamic. The program loads
with the PyTorch version that exported it or a newer one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ulm_dist.deploy.onnx_detector import ONNX_NAME, OnnxError, OnnxProgram
from ulm_dist.evaluate.regression import apply_linear_map
from ulm_dist.models.landmarks import to_pixels

DETECTOR_NAME = "detector.pt2"
MODEL_WEIGHTS_NAME = "model.pt"
CONFIG_NAME = "config.yaml"
METADATA_NAME = "metadata.json"
REGRESSOR_NAME = "regressor.json"
README_NAME = "README.md"
# Bumped when the folder's layout or a file's meaning changes.
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """A folder that is not a usable exported detector; says what is missing."""


@dataclass(frozen=True)
class Regressor:
    """targets ~ [points, 1?] @ weights on pixel coordinates, as `ulm_dist.evaluate` fits it."""

    weights: torch.Tensor  # (2K [+ 1], 2L), float64
    bias: bool = False
    layout: str | None = None  # name of the annotated landmark layout, if known

    @property
    def num_annotated(self) -> int:
        return self.weights.shape[1] // 2

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "bias": self.bias, "layout": self.layout}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], num_landmarks: int, source: str) -> Regressor:
        """Checked against K: a map fitted on another model's landmarks is refused."""
        try:
            weights = torch.as_tensor(raw["weights"], dtype=torch.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(
                f"{source}: expected a 'weights' matrix (2K [+1] rows, 2L columns): {error}"
            ) from error
        bias = bool(raw.get("bias", False))
        rows = 2 * num_landmarks + int(bias)
        if weights.ndim != 2 or weights.shape[0] != rows or weights.shape[1] % 2:
            raise ArtifactError(
                f"{source}: weights of shape {tuple(weights.shape)} do not map this model's "
                f"{num_landmarks} landmarks (bias={bias}); expected ({rows}, 2L), as fitted by "
                "ulm_dist.evaluate on this checkpoint's landmarks"
            )
        return cls(weights, bias, raw.get("layout"))


@dataclass
class Detector:
    # The exported pose encoder, images -> (B, K, 2) in [-1, 1]: the torch.export program's
    # module, or detector.onnx in onnxruntime (onnx_detector.OnnxProgram).
    program: nn.Module | Callable[[torch.Tensor], torch.Tensor]
    image_size: int  # S
    num_landmarks: int  # K
    device: torch.device
    metadata: dict[str, Any] = field(default_factory=dict)
    regressor: Regressor | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) RGB in [0, 1] -> landmarks (B, K, 2) in pixels (x, y)."""
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, expected))}), got "
                f"{tuple(images.shape)}; centre-crop and resize them to {self.image_size} pixels"
            )
        with torch.no_grad():
            points = self.program(images.to(self.device, torch.float32))
        return to_pixels(points, self.image_size)

    def regress(self, points: torch.Tensor) -> torch.Tensor | None:
        """Discovered landmarks (B, K, 2) in pixels -> the annotated ones (B, L, 2), or None
        without a regressor."""
        if self.regressor is None:
            return None
        weights = self.regressor.weights.to(points.device)
        return apply_linear_map(weights, points, self.regressor.bias)


def load_detector(
    folder: str | Path,
    device: str | torch.device = "cpu",
    runtime: Literal["torch", "onnx"] = "torch",
) -> Detector:
    """The detector exported to `folder`, on `device`: its torch.export program, or with
    runtime="onnx" its detector.onnx in onnxruntime (CUDA provider for a cuda device; images
    and landmarks then stay on the CPU, onnxruntime copies them). Besides metadata.json, only
    the runtime's own file must be there."""
    folder = Path(folder)
    device = torch.device(device)
    # Only what the runtime runs is needed: a folder may be shipped with one model file.
    program_name = ONNX_NAME if runtime == "onnx" else DETECTOR_NAME
    if not (folder / METADATA_NAME).is_file():
        missing = [name for name in (program_name, METADATA_NAME) if not (folder / name).is_file()]
        raise ArtifactError(
            f"{folder}: not an exported detector (missing {', '.join(missing)}); "
            "make one with `python -m ulm_dist.export RUN --out FOLDER`"
        )
    metadata = json.loads((folder / METADATA_NAME).read_text())
    if runtime == "onnx":
        try:
            program = OnnxProgram(folder / ONNX_NAME, use_cuda=device.type == "cuda")
        except OnnxError as error:
            raise ArtifactError(str(error)) from error
        device = torch.device("cpu")
    elif not (folder / DETECTOR_NAME).is_file():
        instead = (
            f"the folder has {ONNX_NAME}: run it with --runtime onnx (runtime='onnx'), or "
            if (folder / ONNX_NAME).is_file()
            else ""
        )
        raise ArtifactError(
            f"{folder / DETECTOR_NAME}: no such file, and the torch runtime runs this "
            f"torch.export program; {instead}export the checkpoint again with "
            "`python -m ulm_dist.export`"
        )
    else:
        program = load_program(folder / DETECTOR_NAME, device)
    num_landmarks = metadata["num_landmarks"]
    regressor = None
    regressor_file = folder / REGRESSOR_NAME
    if regressor_file.is_file():
        raw = json.loads(regressor_file.read_text())
        regressor = Regressor.from_dict(raw, num_landmarks, str(regressor_file))
    return Detector(program, metadata["image_size"], num_landmarks, device, metadata, regressor)


def load_program(path: Path, device: torch.device) -> nn.Module:
    """The torch.export program at `path`, as a module on `device`."""
    program = torch.export.load(path)
    if device.type != "cpu":
        # Imported here: PyTorch before 2.6 lacks it, and loading on the CPU needs none of it.
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module()
