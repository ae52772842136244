"""`python -m ulm_dist.data prepare`: bad options and bad input end in one clear line and
exit status 2, never a traceback."""

from __future__ import annotations

import shutil

import pytest
from test_prepare_cub import write_cub

from ulm_dist.data.__main__ import main
from ulm_dist.data.benchmarks import annotation_files
from ulm_dist.extras import MissingExtraError

PREFIX = "python -m ulm_dist.data prepare: error: "


@pytest.mark.parametrize(
    ("option", "value"),
    [("--crop-fraction", "0"), ("--crop-fraction", "1.5"), ("--frame-step", "0")],
)
def test_out_of_range_options_are_refused_by_name(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["prepare", "h36m", str(tmp_path), str(tmp_path / "out"), option, value])
    assert exited.value.code == 2
    assert f"argument {option}: expected" in capsys.readouterr().err


def run_prepare(name, source, dest, capsys) -> str:
    argv = ["prepare", name, str(source), str(dest), "--workers", "1", "--no-progress"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    return error


def test_a_missing_extra_is_one_line(tmp_path, monkeypatch, capsys):
    source = tmp_path / "aflw"
    (source / "output").mkdir(parents=True)
    (source / "aflw_train_images.txt").write_text("image00001.jpg\n")
    (source / "aflw_train_keypoints.mat").write_bytes(b"")

    def without_scipy(module, extra, purpose):
        raise MissingExtraError(f"{purpose} needs {module}: pip install 'ulm_dist[{extra}]'")

    monkeypatch.setattr(annotation_files, "require", without_scipy)
    error = run_prepare("aflw", source, tmp_path / "out", capsys)
    assert error.startswith(PREFIX) and "pip install 'ulm_dist[datasets]'" in error


def test_a_split_without_images_is_one_line(tmp_path, capsys):
    source = write_cub(tmp_path / "CUB_200_2011")
    shutil.rmtree(source / "images")
    error = run_prepare("cub", source, tmp_path / "out", capsys)
    assert error.startswith(PREFIX) and "the train split has no image to write" in error
