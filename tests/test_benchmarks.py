"""The benchmark scripts, run as users run them with small sizes on the CPU, write the JSON
that BENCHMARKS.md's tables come from. Their speeds are printed, never asserted here."""

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from benchmarks.gpu_check import Stage, run_stage, table
from benchmarks.gpu_step import scaling_table

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str) -> None:
    subprocess.run([sys.executable, str(BENCHMARKS / name), *args], check=True, timeout=600)


@pytest.mark.slow
def test_gpu_step_measures_the_gradient_volume_it_scales_with(tmp_path):
    out = tmp_path / "gpu_step.json"
    run_script(
        "gpu_step.py",
        *("--preset", "tiny", "--precision", "fp32", "--batch", "2"),
        *("--steps", "1", "--warmup", "1", "--zero", "0", "3", "--out", str(out)),
    )
    report = json.loads(out.read_text())
    plain, zero0, zero3 = report["results"]
    assert all(row["step_s"] > 0 for row in report["results"])
    gradient_bytes = 4 * plain["trainable_params"]  # fp32
    # In one process DeepSpeed still reduces every gradient once a step (all-reduce at
    # ZeRO-0, reduce-scatter at ZeRO-3), plus a few scalars such as the gradient norm.
    for row in (zero0, zero3):
        assert gradient_bytes <= sum(row["collective_bytes"].values()) <= gradient_bytes + 64
    assert report["gradient_bytes_source"] == "measured: deepspeed-zero0"
    assert report["gradient_bytes"] == zero0["collective_bytes"]["all_reduce"]
    gpus = [row["gpus"] for row in report["scaling"]]
    assert gpus == [8, 64, 512]
    # The estimate is made from this run's plain-loop step and measured volume.
    assert report["scaling"] == scaling_table(plain["step_s"], 2, report["gradient_bytes"])


def test_scaling_adds_a_ring_all_reduce_to_the_step():
    # 8.5 MB of gradients after a 250 ms step of 64 pairs. A ring all-reduce sends 2 (N-1)/N
    # of them from each GPU: 8 GPUs over NVLink at 360 GB/s take 1.75 x 8.5 MB / 360 GB/s =
    # 0.0413 ms; 64 over InfiniBand at 40 GB/s take 1.96875 x 8.5 MB / 40 GB/s = 0.418 ms.
    eight, sixty_four, _ = scaling_table(0.25, 64, 8_500_000)
    assert eight["allreduce_ms"] == pytest.approx(0.041, abs=1e-3)
    assert sixty_four["allreduce_ms"] == pytest.approx(0.418, abs=1e-3)
    # 64 GPUs x 64 pairs: 4,096 pairs per 250.418 ms without overlap, per 250 ms with it.
    assert sixty_four["pairs_per_s_no_overlap"] == 16_357
    assert sixty_four["pairs_per_s_full_overlap"] == 16_384


@pytest.mark.slow
def test_data_throughput_covers_every_source_pair_kind_and_loader_count(tmp_path):
    out = tmp_path / "data.json"
    run_script(
        "data_throughput.py",
        *("--samples", "48", "--generator-samples", "8", "--sizes", "32", "--batch", "8"),
        *("--workers", "0", "1", "--gpu-pairs-per-s", "100", "--out", str(out)),
    )
    report = json.loads(out.read_text())
    [source] = report["sources"]
    assert source["size"] == 32 and min(source["build_local"], source["build_s3"]) > 0
    cells = {(row["pairs"], row["source"], row["loader_processes"]) for row in report["loaders"]}
    assert cells == {
        (pairs, source, workers)
        for pairs in ("unpaired", "warped")
        for source in ("local disk", "S3 (local server)")
        for workers in (0, 1)
    }
    for row in report["loaders"]:
        assert row["pairs_per_s"] > 0
        assert row["processes_per_gpu"] == pytest.approx(100 / row["pairs_per_s_per_process"])


def test_gpu_check_smoke_prints_eager_and_compiled_rows_in_one_table(tmp_path):
    # The tiny stage only: the others run the same runner and table with other scripts,
    # and the whole --cpu-smoke takes minutes on 2 cores (BENCHMARKS.md, GPU speed).
    script = [sys.executable, str(BENCHMARKS / "gpu_check.py")]
    done = subprocess.run(
        [*script, "--cpu-smoke", "--stages", "tiny", "--out", str(tmp_path)],
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith("| tiny |")]
    assert [row.split(" | ")[1].split(",")[0] for row in rows] == [
        "plain",
        "plain compile+channels-last",
    ], done.stdout
    for row in rows:
        pairs_per_s = float(row.split(" | ")[2].replace(",", ""))
        assert pairs_per_s > 0 and row.endswith("| aot_eager |")


def test_gpu_check_keeps_every_stage_row_when_stages_fail_or_hang(tmp_path):
    def python(code: str) -> list[str]:
        return [sys.executable, "-c", code]

    # The hung stage has started a process of its own, which must not outlive it.
    started = tmp_path / "started.pid"
    hang = (
        "import subprocess, time; child = subprocess.Popen(['sleep', '60']); "
        f"open({str(started)!r}, 'w').write(str(child.pid)); time.sleep(30)"
    )
    stages = {
        "paper": run_stage("paper", python(hang), 2, tmp_path, dict),
        "zero": run_stage("zero", python("raise SystemExit(3)"), 30, tmp_path, dict),
        "data": Stage("data", problem="not run: the 450 s budget is spent"),
    }
    rows = table(stages, "cpu").splitlines()[4:]
    assert rows[0].startswith("| paper |") and "timed out after 2 s" in rows[0]
    with contextlib.suppress(psutil.NoSuchProcess):
        assert psutil.Process(int(started.read_text())).status() == psutil.STATUS_ZOMBIE
    assert rows[1].startswith("| zero |") and "exit code 3" in rows[1]
    assert "log: " in rows[1] and rows[2].endswith("| not run: the 450 s budget is spent |")
