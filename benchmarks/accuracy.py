"""Accuracy after a fixed budget: train a learner on an in-memory data set in a plain PyTorch
loop (with the driver's learning-rate warm-up and schedule), then run the landmark-regression
protocol and print the error beside the mean-shape baseline. Not a test: it prints numbers
(and writes JSON and PNG sheets to --out).

    .venv/bin/python benchmarks/accuracy.py --data synthetic --steps 2000 [key=value ...]
    .venv/bin/python benchmarks/accuracy.py --learners cycle imm part --steps 300 \
        loss.perceptual_layers=[pixels]       # the three learners, equal budget, one table
    .venv/bin/python benchmarks/accuracy.py --data faces68 --minutes 5 --device cuda \
        model.preset=paper model.image_size=128

It isolates the model from the distributed stack on purpose: the data sit in (device) memory
as uint8 tensors and unpaired pairs are drawn at random, so the budget goes to the model and
the numbers say what the model and its loss weights can learn, on any machine with torch.
`--data faces68` reads ../shared/data/faces68-dev (or --faces), splits it by identity and
scores the MAFL 5-point protocol; `synthetic` generates the built-in set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from ulm_dist.config import TrainConfig, load_config
from ulm_dist.data import synthetic
from ulm_dist.data.augment import AugmentOptions, View, warped_view
from ulm_dist.data.image_folder import folder_items, load_items, read_landmark_table, split_items
from ulm_dist.data.layouts import MAFL5, LandmarkLayout, ibug68_to_mafl5
from ulm_dist.evaluate.pictures import SHOWN_IMAGES, evaluation_sheets
from ulm_dist.evaluate.regression import (
    RegressionReport,
    inter_ocular_distance,
    landmark_regression,
    normalised_errors,
)
from ulm_dist.models import build_learner
from ulm_dist.models.landmarks import to_pixels
from ulm_dist.train.engine import lr_scheduler

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces68-dev"


class Split:
    """Images (N, S, S, 3) uint8 and annotated landmarks (N, L, 2) in pixels, on a device."""

    def __init__(self, images: np.ndarray, landmarks: np.ndarray, device: torch.device):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.landmarks = torch.from_numpy(landmarks.astype(np.float32))

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        return self.images[index].permute(0, 3, 1, 2).float() / 255


def synthetic_splits(size: int, train: int, test: int, device: torch.device):
    images, landmarks = synthetic.generate(train + test, size, np.random.default_rng(0))
    cut = slice(0, train), slice(train, None)
    return (*(Split(images[c], landmarks[c], device) for c in cut), synthetic.SYNTHETIC_LAYOUT)


def faces_splits(folder: Path, size: int, device: torch.device):
    if not (folder / "landmarks.csv").is_file():
        raise SystemExit(f"{folder}: no landmarks.csv; pass --faces PATH to faces68-dev")
    items = folder_items(folder / "img", read_landmark_table(folder / "landmarks.csv"))
    splits = split_items(items, {"test": 0.1}, group_by="identity", seed=0)
    out = []
    for name in ("train", "test"):
        samples = load_items(splits[name], size)
        images = np.stack([s.image for s in samples])
        out.append(Split(images, ibug68_to_mafl5(np.stack([s.landmarks for s in samples])), device))
    return (*out, MAFL5)


def warped(images: torch.Tensor, options: AugmentOptions, rng: np.random.Generator) -> torch.Tensor:
    views = [warped_view(View(image, None), options, rng).image for image in images.cpu().numpy()]
    return torch.from_numpy(np.stack(views)).to(images.device)


@torch.no_grad()
def discovered(learner, split: Split, batch: int, size: int) -> torch.Tensor:
    points = [
        learner.landmarks(split.batch(torch.arange(i, min(i + batch, len(split)))))
        for i in range(0, len(split), batch)
    ]
    return to_pixels(torch.cat(points).float().cpu(), size)


@torch.no_grad()
def mean_spread(learner, split: Split, batch: int = 256) -> float:
    """Mean spread var(x) + var(y) of the score maps over the first `batch` images: how peaked
    the detector's maps are (0: a single position; `landmarks.spatial_softmax_with_spread`)."""
    images = split.batch(torch.arange(min(batch, len(split)), device=split.images.device))
    return learner.model.pose_encoder(images).spread.float().mean().item()


def evaluate(learner, fit: Split, test: Split, layout: LandmarkLayout, size: int):
    learner.eval()
    fit_points, test_points = (discovered(learner, s, 256, size) for s in (fit, test))
    learner.train()
    report = landmark_regression(
        fit_points,
        fit.landmarks,
        test_points,
        test.landmarks,
        eyes=(layout.eye_left, layout.eye_right),
    )
    return report, fit_points, test_points


# What each learner needs besides the shared defaults: imm and part learn from an image and
# its warp.
LEARNER_SETTINGS = {
    "cycle": [],
    "imm": ["model.name=imm", "data.pairs=warped"],
    "part": ["model.name=part", "data.pairs=warped"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["synthetic", "faces68"], default="synthetic")
    parser.add_argument("--faces", type=Path, default=FACES)
    parser.add_argument("--config", help="job YAML whose model/loss/train settings to use")
    parser.add_argument(
        "--learners",
        nargs="+",
        choices=sorted(LEARNER_SETTINGS),
        help="train each of these with the same budget, then print one comparison table "
        "(the overrides apply to all)",
    )
    parser.add_argument(
        "--supervised",
        action="store_true",
        help="train the pose encoder on the annotated landmarks instead of the learner's "
        "loss: what this detector could reach at this size, the ceiling of the protocol "
        "(needs model.num_landmarks equal to the annotated points)",
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--minutes", type=float, help="stop after this much training time")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument(
        "--train-samples",
        type=int,
        help="synthetic only: training images (default: the config's data.synthetic_samples)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench_out/accuracy"))
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.learners:
        cfg = load_config(args.config, args.overrides)
        train_and_score(args, cfg, load_splits(args, cfg), args.out)
        return
    configs = {
        name: load_config(args.config, [*LEARNER_SETTINGS[name], *args.overrides])
        for name in args.learners
    }
    # The learners differ in model.name and data.pairs only: one image size, one data set.
    splits = load_splits(args, configs[args.learners[0]])
    rows = []
    for name, cfg in configs.items():
        summary = train_and_score(args, cfg, splits, args.out / name)
        rows.append({"learner": name, **{k: summary[k] for k in COMPARED}})
    (args.out / "comparison.json").write_text(json.dumps(rows, indent=1))
    print(comparison_table(rows))


COMPARED = (
    "steps",
    "train_minutes",
    "pairs_per_s",
    "landmark_error",
    "mean_shape_error",
    "spread",
)


def comparison_table(rows: list[dict]) -> str:
    """A Markdown table, one row per learner, ready for BENCHMARKS.md."""
    lines = ["| learner | " + " | ".join(COMPARED) + " |", "|---" * (len(COMPARED) + 1) + "|"]
    lines += ["| " + " | ".join(str(row[k]) for k in ("learner", *COMPARED)) + " |" for row in rows]
    return "\n".join(lines)


def learning_rate_schedule(train: TrainConfig, steps: int, optimizer: torch.optim.Optimizer):
    """The driver's warm-up and decay (`train.warmup_steps`, `train.lr_schedule`) for a run of
    `steps` (--steps, also with --minutes), through DeepSpeed's own scheduler classes, so
    that a setting measured here trains the same way through `ulm_dist.train`."""
    from deepspeed.runtime import lr_schedules

    section = lr_scheduler(dataclasses.replace(train, steps=steps))
    return getattr(lr_schedules, section["type"])(optimizer, **section["params"])


def load_splits(args, cfg) -> tuple[Split, Split, LandmarkLayout]:
    """The fit and test splits of `--data` at model.image_size, on `--device`, and their
    layout."""
    size, device = cfg.model.image_size, torch.device(args.device)
    if args.data == "synthetic":
        return synthetic_splits(size, args.train_samples or cfg.data.synthetic_samples, 500, device)
    return faces_splits(args.faces, size, device)


def train_and_score(args, cfg, splits: tuple[Split, Split, LandmarkLayout], out: Path) -> dict:
    """Trains one learner in memory for the budget in `args`, then writes its results to
    `out` and returns their summary."""
    size, batch = cfg.model.image_size, cfg.train.batch_size
    device = torch.device(args.device)
    fit, test, layout = splits
    torch.manual_seed(cfg.train.seed)
    learner = build_learner(cfg.model, cfg.loss).to(device)
    trainable = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, cfg.train.lr, weight_decay=cfg.train.weight_decay)
    schedule = learning_rate_schedule(cfg.train, args.steps, optimizer)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    # data.pairs=warped (conditional generation): the pair is an image and its warp, made on
    # the CPU by the data pipeline's own warp.
    warps = AugmentOptions.from_config(cfg.data) if cfg.data.pairs == "warped" else None
    rng = np.random.default_rng(cfg.train.seed)
    targets = supervised_targets(fit, cfg.model.num_landmarks, size) if args.supervised else None
    history, step, trained_s = [], 0, 0.0
    report, *_ = evaluate(learner, fit, test, layout, size)
    print(f"step 0: error {report.error:.2f}% (mean shape {report.baseline_error:.2f}%)")
    while step < args.steps and (args.minutes is None or trained_s < 60 * args.minutes):
        started = time.perf_counter()
        for _ in range(min(args.eval_every, args.steps - step)):
            i, j = (torch.randint(len(fit), (batch,), device=device) for _ in range(2))
            image_i = fit.batch(i)
            with autocast:
                if targets is not None:
                    points = learner.model.pose_encoder(image_i).points
                    losses = {"total": squared_distance(points, targets[i])}
                else:
                    image_j = warped(image_i, warps, rng) if warps else fit.batch(j)
                    losses = learner(image_i, image_j)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        trained_s += time.perf_counter() - started
        report, fit_points, test_points = evaluate(learner, fit, test, layout, size)
        learner.eval()
        spread = mean_spread(learner, test)
        learner.train()
        history.append(
            {"step": step, "train_s": trained_s, "spread": spread, **report.as_metrics()}
        )
        if targets is not None:
            history[-1]["detector_error"] = detector_error(test_points, test.landmarks, layout)
            print(f"step {step}: the detector's own error {history[-1]['detector_error']:.2f}%")
        print(
            f"step {step}: loss {losses['total'].item():.4f}, error {report.error:.2f}% "
            f"(mean shape {report.baseline_error:.2f}%), spread {spread:.4f}, "
            f"{step * batch / trained_s:.1f} pairs/s",
            flush=True,
        )
    return write_results(
        args, cfg, out, learner, fit, test, report, fit_points, test_points, history
    )


def supervised_targets(fit: Split, num_landmarks: int, size: int) -> torch.Tensor:
    """`--supervised`: the annotated points of `fit` in normalised units, on its device, once
    for the whole run (N, L, 2); refused unless the detector finds L points."""
    annotated = fit.landmarks.shape[1]
    if num_landmarks != annotated:
        raise SystemExit(
            f"--supervised: the detector finds {num_landmarks} points, the data annotate "
            f"{annotated}; set model.num_landmarks={annotated}"
        )
    return (fit.landmarks * (2 / size) - 1).to(fit.images.device)


def squared_distance(points: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over images and points of |point - target|^2: `--supervised`'s loss."""
    return ((points.float() - targets) ** 2).sum(-1).mean()


def detector_error(points: torch.Tensor, annotated: torch.Tensor, layout: LandmarkLayout):
    """The detector's points against the annotated ones with no linear map between them, in
    percent of the inter-ocular distance: `--supervised`'s own error. Only a detector trained
    to put its k-th point on the k-th annotated one can make it small: an unsupervised
    learner's points come in no particular order."""
    iod = inter_ocular_distance(annotated, layout.eye_left, layout.eye_right)
    return normalised_errors(points, annotated, iod).mean().item()


def write_results(
    args,
    cfg,
    out: Path,
    learner,
    fit,
    test,
    report: RegressionReport,
    fit_points,
    test_points,
    history,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    last = history[-1]
    summary = {
        "data": args.data,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "precision": args.precision,
        "steps": last["step"],
        "train_minutes": round(last["train_s"] / 60, 2),
        "pairs_per_s": round(last["step"] * cfg.train.batch_size / last["train_s"], 2),
        "landmark_error": round(report.error, 3),
        "mean_shape_error": round(report.baseline_error, 3),
        "reverse_error": round(report.reverse_error, 3),
        # In the annotation's order: which annotated points the learned ones fail to carry.
        "per_landmark_error": [round(error, 2) for error in report.per_landmark],
        "spread": round(last["spread"], 4),
        **(
            {"detector_error": round(last["detector_error"], 3)} if "detector_error" in last else {}
        ),
        "config": cfg.to_dict(),
        "history": history,
    }
    (out / "accuracy.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "history")}))
    shown = torch.arange(min(SHOWN_IMAGES, len(test)))
    learner.eval()
    sheets = evaluation_sheets(
        learner.model.float(),
        test.batch(shown.to(test.images.device)),
        test_points[shown],
        report.predicted[shown],
        test.landmarks[shown],
    )
    for name, sheet in sheets.items():
        sheet.save(out / f"{name}.png")
    return summary


if __name__ == "__main__":
    main()
