"""Optional dependencies, grouped as pyproject.toml's extras: what needs one names it.

    ulm-dist[onnx]     onnx, onnxscript, onnxruntime: detector.onnx, `predict --runtime onnx`
    ulm-dist[mlflow]   mlflow: `train.tracking: mlflow`
    ulm-dist[sweep]    optuna: `search.algorithm: optuna`
    ulm-dist[datasets] scipy: `python -m ulm_dist.data prepare aflw|h36m` (MATLAB files)

`./scripts/setup` installs all of them (the `test` extra includes them).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency that is not installed; says which extra brings it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`module`, imported; a MissingExtraError naming the extra to install if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(
            f"{purpose} needs the {module} package, which is not installed: "
            f"pip install 'ulm-dist[{extra}]'"
        ) from error


def installed(*modules: str) -> bool:
    """Whether every one of `modules` can be imported (without importing them)."""
    return all(importlib.util.find_spec(module) is not None for module in modules)
