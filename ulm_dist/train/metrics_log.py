"""A run's metrics on the driver's machine, and the progress line printed for each report.

`MetricsLog` keeps `metrics.jsonl` (one JSON record per report) and TensorBoard event files
in one folder. After a worker failure, or a rerun of a stopped run, training goes back to the
last checkpoint and reports again steps that the abandoned attempt already reported. Reports
come at a fixed set of steps (multiples of `train.log_every`, of `train.checkpoint_every`,
with `data.val` of `train.eval_every`, and the last step), so the first report after resuming
is the first step of that set past the checkpoint, and everything the abandoned attempt
logged past the checkpoint is at or after it. A record for a step at or before the last one
kept therefore replaces the records from that step on: no step is counted twice, in the file
or in TensorBoard.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ulm_dist.evaluate.regression import MEAN_SHAPE_ERROR, VAL_LANDMARK_ERROR, VAL_PREFIX

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, one per report; none if there is no such file."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / METRICS_NAME
        self.records = read_metrics(self.path)
        self._writer = None  # opened at the first record: it must know where to purge from

    def append(self, record: dict[str, Any]) -> bool:
        """Add one report's metrics; True when it went back over steps already recorded."""
        step = record["step"]
        rewound = bool(self.records) and step <= self.records[-1]["step"]
        if rewound:
            self.records = [kept for kept in self.records if kept["step"] < step]
            self.path.write_text("".join(json.dumps(kept) + "\n" for kept in self.records))
        if rewound or self._writer is None:
            self._open_writer(purge_step=step)
        self.records.append(record)
        with self.path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()
        return rewound

    def add_image(self, tag: str, png: bytes, step: int) -> None:
        """A picture for TensorBoard; call after `append` of the same step's record."""
        picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self._writer.add_image(tag, picture, global_step=step, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open_writer(self, purge_step: int) -> None:
        # Imported here: the driver pickles this object before it has written anything.
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        # purge_step hides, in TensorBoard, the events an abandoned attempt wrote from there on.
        self._writer = SummaryWriter(str(self.folder / TENSORBOARD_NAME), purge_step=purge_step)


def progress_line(record: dict[str, Any], total_steps: int) -> str:
    """One line per report: step, losses, throughput, data-wait share, ETA."""
    step = record["step"]
    losses = {
        name.removeprefix("loss/"): value
        for name, value in record.items()
        if name.startswith("loss/")
    }
    terms = " ".join(
        f"{name} {value:.4f}" for name, value in sorted(losses.items()) if name != "total"
    )
    step_time = record["time/step_s"]
    parts = [
        f"step {step:>{len(str(total_steps))}}/{total_steps}",
        f"loss {losses['total']:.4f} ({terms})",
        f"{record['throughput/pairs_per_s']:.1f} pairs/s "
        f"({record['throughput/pairs_per_s_per_worker']:.1f}/worker)",
        f"data wait {100 * record['time/data_wait_s'] / step_time:.0f}%",
    ]
    if VAL_LANDMARK_ERROR in record:
        parts.append(
            f"val error {record[VAL_LANDMARK_ERROR]:.2f}% "
            f"(mean shape {record[VAL_PREFIX + MEAN_SHAPE_ERROR]:.2f}%)"
        )
    if record["data/skipped"]:
        parts.append(f"skipped {record['data/skipped']}")
    if "memory/peak_gpu_mib" in record:
        parts.append(f"GPU {record['memory/peak_gpu_mib']:.0f} MiB")
    parts.append(f"ETA {format_duration((total_steps - step) * step_time)}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
