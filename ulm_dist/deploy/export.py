"""Export a run's best (or latest, or a given) checkpoint as a standalone detector folder.

    python -m ulm_dist.export RUN_OR_CHECKPOINT --out DIR [--checkpoint best|latest|STEP]
                              [--regressor FILE] [--s3-endpoint-url URL] [--overwrite]
                              [--no-onnx]

RUN_OR_CHECKPOINT is a run folder (`runs/demo`, `s3://bucket/prefix/demo`) or one of its
`checkpoint_<step>` folders. `best` (the default for a run) is the complete checkpoint with
the lowest `val/landmark_error` in its completion marker; a run trained without validation
has none, and then the latest is taken and the output says so. The folder written is
described in `ulm_dist.deploy.artifact`: the detector as a `torch.export` program and, unless
--no-onnx, as `detector.onnx` for onnxruntime (`deploy/onnx_detector.py`; needs the `onnx`
extra). It is built in a temporary folder beside DIR and renamed
into place, so a crash never leaves half an artifact.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ulm_dist.deploy import artifact
from ulm_dist.deploy.artifact import ArtifactError, Regressor
from ulm_dist.deploy.onnx_detector import ONNX_NAME, ONNX_OPSET, OnnxError, write_onnx
from ulm_dist.deploy.trained import TrainedModel, load_trained
from ulm_dist.evaluate.regression import VAL_LANDMARK_ERROR
from ulm_dist.extras import MissingExtraError
from ulm_dist.redaction import redacted_config
from ulm_dist.storage import S3Options, StorageError
from ulm_dist.train.checkpoint import CHECKPOINT_PREFIX, CheckpointStore, StoredCheckpoint

# Written into the completion marker by periodic evaluation; lower is better.
SELECTION_METRIC = VAL_LANDMARK_ERROR
# Largest difference in normalised units allowed between the exported program and the model
# it was exported from, on random images (float32 reassociation stays far below it).
EXPORT_TOLERANCE = 1e-5


class ExportError(RuntimeError):
    """A request that cannot be met (no such step, existing output); says what to do."""


class PoseDetector(nn.Module):
    """The pose encoder with only its landmarks as output: what the artifact exports."""

    def __init__(self, pose_encoder: nn.Module):
        super().__init__()
        self.pose_encoder = pose_encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pose_encoder(images)[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        s3 = S3Options(endpoint_url=args.s3_endpoint_url)
        uri, reason = resolve_checkpoint(args.source, args.checkpoint, s3)
        print(f"exporting {uri} ({reason})", flush=True)
        trained = load_trained(uri, s3)
        regressor = read_regressor(args.regressor, trained.config.model.num_landmarks)
        out = export(trained, args.out, reason, regressor, overwrite=args.overwrite, onnx=args.onnx)
    except (StorageError, ExportError, ArtifactError, OnnxError, MissingExtraError) as error:
        print(f"ulm_dist.export: error: {error}", file=sys.stderr)
        return 2
    print(f"artifact: {out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ulm_dist.export",
        description="Write a checkpoint's detector as a folder that needs only PyTorch "
        "(detector.pt2) or only onnxruntime (detector.onnx).",
    )
    parser.add_argument("source", help="a run folder or a checkpoint_<step> folder (or s3://)")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    parser.add_argument(
        "--checkpoint",
        help="for a run: best (default; lowest val/landmark_error, else the latest), latest, "
        "or a step number",
    )
    parser.add_argument(
        "--regressor",
        type=Path,
        help="a fitted K -> L landmark map to include: JSON (or torch.save'd dict) with "
        "'weights' (2K [+1] x 2L, pixel coordinates), optional 'bias' and 'layout'",
    )
    parser.add_argument("--s3-endpoint-url", help="endpoint of an S3-compatible store")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--no-onnx",
        dest="onnx",
        action="store_false",
        help="write no detector.onnx (which needs pip install 'ulm-dist[onnx]')",
    )
    return parser.parse_args(argv)


def resolve_checkpoint(source: str, choice: str | None, s3: S3Options) -> tuple[str, str]:
    """The URI of the checkpoint to export, and why it was picked."""
    name = source.rstrip("/").rpartition("/")[2]
    if name.startswith(CHECKPOINT_PREFIX):
        if choice is not None:
            raise ExportError(
                f"--checkpoint {choice}: {source} is already one checkpoint; pass its run folder "
                "to choose among the run's checkpoints"
            )
        return source, "the checkpoint given"
    parent = source.rstrip("/").rpartition("/")[0] or "."
    store = CheckpointStore(parent, name, s3)
    checkpoints = store.checkpoints()
    if not checkpoints:
        if store.has_checkpoint_folders():
            raise ExportError(
                f"{source}: the run has checkpoint folders but none is complete (no marker, or "
                "files missing); wait for training to write one, or export a complete run"
            )
        raise ExportError(
            f"{source}: neither a run folder with checkpoints (<run>/{CHECKPOINT_PREFIX}<step>/) "
            f"nor a {CHECKPOINT_PREFIX}<step> folder; pass a run that training printed as its "
            "run folder, or one of its checkpoints"
        )
    checkpoint, reason = choose_checkpoint(checkpoints, choice or "best")
    return store.uri(checkpoint.path), reason


def choose_checkpoint(
    checkpoints: list[StoredCheckpoint], choice: str
) -> tuple[StoredCheckpoint, str]:
    """best, latest or a step among a run's complete checkpoints (oldest first), and why."""
    steps = [checkpoint.step for checkpoint in checkpoints]
    if choice == "latest":
        return checkpoints[-1], "latest"
    if choice == "best":
        scored = [c for c in checkpoints if validation_error(c) is not None]
        if not scored:
            return checkpoints[-1], f"latest: no checkpoint has {SELECTION_METRIC}"
        best = min(scored, key=validation_error)
        return best, f"best: lowest {SELECTION_METRIC} = {validation_error(best):.4g}"
    if not choice.isdigit():
        raise ExportError(f"--checkpoint: expected best, latest or a step number, got {choice!r}")
    if int(choice) not in steps:
        raise ExportError(
            f"--checkpoint {choice}: the run has no complete checkpoint at that step; "
            f"it has steps {steps}"
        )
    return checkpoints[steps.index(int(choice))], f"step {choice}"


def validation_error(checkpoint: StoredCheckpoint) -> float | None:
    return checkpoint.info.get("metrics", {}).get(SELECTION_METRIC)


def read_regressor(path: Path | None, num_landmarks: int) -> Regressor | None:
    """The regressor in a JSON file or a torch.save'd dict, checked against K."""
    if path is None:
        return None
    if not path.is_file():
        raise ExportError(f"--regressor {path}: no such file")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, RuntimeError, pickle.UnpicklingError) as error:
        raise ExportError(
            f"--regressor {path}: cannot read it ({error}); expected JSON or a torch.save'd dict"
        ) from error
    if not isinstance(raw, dict):
        raise ExportError(f"--regressor {path}: expected a mapping with 'weights', got {raw!r:.80}")
    return Regressor.from_dict(raw, num_landmarks, str(path))


def export(
    trained: TrainedModel,
    out: Path,
    reason: str,
    regressor: Regressor | None = None,
    *,
    overwrite: bool = False,
    onnx: bool = True,
) -> Path:
    """Write the artifact for `trained` to `out`, all at once; returns the folder. With
    `onnx`, detector.onnx too (a MissingExtraError if the `onnx` extra is not installed)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"--out {out}: already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        write_artifact(staging, trained, reason, regressor, onnx)
        if out.exists():
            # Moved aside, not deleted first: until the rename, the old artifact is whole.
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_artifact(
    folder: Path, trained: TrainedModel, reason: str, regressor: Regressor | None, onnx: bool
) -> None:
    model = trained.learner.model
    size = trained.config.model.image_size
    detector = PoseDetector(model.pose_encoder).eval()
    # Batch 2 as the example: export specialises a dimension of size 1 to a constant.
    example = torch.rand(2, 3, size, size)
    batch = torch.export.Dim("batch")
    program = torch.export.export(detector, (example,), dynamic_shapes=({0: batch},))
    check_export(detector, program.module(), size)
    torch.export.save(program, folder / artifact.DETECTOR_NAME)
    if onnx:
        write_onnx(detector, program, size, folder / ONNX_NAME)
    torch.save(model.state_dict(), folder / artifact.MODEL_WEIGHTS_NAME)
    (folder / artifact.CONFIG_NAME).write_text(
        yaml.safe_dump(redacted_config(trained.config), sort_keys=False)
    )
    metadata = describe(trained, reason, regressor, onnx)
    (folder / artifact.METADATA_NAME).write_text(json.dumps(metadata, indent=1))
    if regressor is not None:
        (folder / artifact.REGRESSOR_NAME).write_text(json.dumps(regressor.to_dict()))
    (folder / artifact.README_NAME).write_text(readme(metadata))


def check_export(original: nn.Module, exported: nn.Module, size: int) -> None:
    """The exported program must give the model's landmarks, at batch sizes it was not
    exported with too."""
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (exported(images) - original(images)).abs().max().item()
    if difference > EXPORT_TOLERANCE:
        raise ExportError(
            f"the exported detector differs from the checkpoint's by {difference:.3g} "
            f"(allowed {EXPORT_TOLERANCE}); please report this with the torch version "
            f"{torch.__version__}"
        )


def describe(
    trained: TrainedModel, reason: str, regressor: Regressor | None, onnx: bool = False
) -> dict[str, Any]:
    """metadata.json: where the weights came from and what they scored."""
    return {
        "format_version": artifact.FORMAT_VERSION,
        "source": trained.uri,
        "step": trained.step,
        "selected": reason,
        "run_name": trained.config.train.run_name,
        "model": trained.config.model.name,
        "image_size": trained.config.model.image_size,
        "num_landmarks": trained.config.model.num_landmarks,
        "layout": regressor.layout if regressor else None,
        "num_annotated": regressor.num_annotated if regressor else None,
        "metrics": trained.info.get("metrics", {}),
        "torch_version": torch.__version__,
        "onnx_opset": ONNX_OPSET if onnx else None,  # None: no detector.onnx
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def readme(metadata: dict[str, Any]) -> str:
    size, k = metadata["image_size"], metadata["num_landmarks"]
    scores = "\n".join(
        f"| {name} | {value:.4g} |" if isinstance(value, (int, float)) else f"| {name} | {value} |"
        for name, value in metadata["metrics"].items()
    )
    scored = (
        f"| metric | value |\n| --- | --- |\n{scores}"
        if scores
        else "No validation metrics were recorded (train with `data.val=...` to get them)."
    )
    regressor = (
        f"`regressor.json` maps the {k} landmarks to {metadata['num_annotated']} annotated ones "
        "in pixels: `torch.cat([pixels.flatten(1), ones (only if bias)], 1) @ weights`, "
        "reshaped to (B, L, 2)."
        if metadata["num_annotated"]
        else "No regressor to annotated landmarks is included."
    )
    onnx = (
        f"""## With onnxruntime alone (no PyTorch)

`detector.onnx` is the same detector as an ONNX model (opset {metadata["onnx_opset"]}, dynamic batch
dimension): `pip install onnxruntime numpy` (onnxruntime-gpu on a GPU).

```python
import numpy as np, onnxruntime as ort
session = ort.InferenceSession("detector.onnx", providers=["CPUExecutionProvider"])
images = np.random.rand(4, 3, {size}, {size}).astype(np.float32)  # RGB in [0, 1], as above
points = session.run(["landmarks"], {{"images": images}})[0]  # (4, {k}, 2) in [-1, 1]
pixels = (points + 1) * {size} / 2
```

`python -m ulm_dist.predict FOLDER IMAGES... --out DIR --runtime onnx` runs it on image files.
"""
        if metadata.get("onnx_opset")
        else "No `detector.onnx` was written (exported with --no-onnx)."
    )
    return f"""# Landmark detector: {metadata["run_name"]}, step {metadata["step"]}

Exported by `python -m ulm_dist.export` from `{metadata["source"]}` ({metadata["selected"]}).
{k} landmarks on {size}x{size} RGB images. Needs only PyTorch {metadata["torch_version"]} or
newer:

```python
import torch
detector = torch.export.load("detector.pt2").module()
images = torch.rand(4, 3, {size}, {size})  # RGB in [0, 1]: centre square crops resized to {size}
points = detector(images)  # (4, {k}, 2): (x, y) in [-1, 1], the image spanning [-1, 1]
pixels = (points + 1) * {size} / 2  # pixel i's centre at i + 0.5
```

On a GPU: `torch.export.passes.move_to_device_pass(torch.export.load(...), "cuda")`. With
ulm_dist installed, `ulm_dist.deploy.artifact.load_detector(folder)` does this and returns pixels;
`python -m ulm_dist.predict FOLDER IMAGES... --out DIR` runs it on image files.

`model.pt` is the state dict of the whole model
(`ulm_dist.models.build_learner(config.model, config.loss).model`, config in `config.yaml`).
{regressor}

{onnx}
## Scores

{scored}
"""
