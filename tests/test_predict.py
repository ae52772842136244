"""`python -m ulm_dist.predict` on image folders, with an artifact exported from a tiny model
(the export of trained checkpoints is tested in test_export.py)."""

from pathlib import Path

import numpy as np
import pyarrow.csv
import pyarrow.parquet
import pytest
import torch
from PIL import Image

from ulm_dist.config import load_config
from ulm_dist.deploy.artifact import Regressor, load_detector
from ulm_dist.deploy.export import export
from ulm_dist.deploy.predict import main
from ulm_dist.deploy.trained import TrainedModel
from ulm_dist.models import build_learner

SIZE, K, L = 16, 4, 3


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_model_overrides) -> Path:
    torch.manual_seed(0)
    config = load_config(None, tiny_model_overrides)
    learner = build_learner(config.model, config.loss).eval()
    trained = TrainedModel(config, learner, step=1, uri="runs/tiny/checkpoint_00000001")
    regressor = Regressor(torch.randn(2 * K, 2 * L, dtype=torch.float64))
    return export(trained, tmp_path_factory.mktemp("artifact") / "tiny", "test", regressor)


def random_picture(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_a_folder_of_images_with_a_corrupt_one(artifact, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    square = random_picture(SIZE, SIZE, 0)
    Image.fromarray(square).save(images / "a_square.png")
    # The square with a strip either side: its centred square is the square itself.
    wide = np.concatenate([random_picture(SIZE, SIZE // 2, 1), square, square[:, : SIZE // 2]], 1)
    Image.fromarray(wide).save(images / "nested" / "b_wide.png")
    Image.fromarray(random_picture(40, 24, 2)).save(images / "c_tall.jpg")
    (images / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "notes.txt").write_text("not an image, not looked at")

    out = tmp_path / "out"
    assert main([str(artifact), str(images), "--out", str(out), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "d_corrupt.png: cannot read the image" in captured.err + captured.out
    assert (
        "4 images found: 3 predicted, 1 failed (see the warnings above); "
        f"landmarks in {out / 'landmarks.csv'}"
    ) in captured.out

    table = pyarrow.csv.read_csv(out / "landmarks.csv").to_pylist()
    assert len(table) == 3 * (K + L)
    assert {row["image"] for row in table} == {
        str(images / "a_square.png"),
        str(images / "c_tall.jpg"),
        str(images / "nested" / "b_wide.png"),
    }
    overlays = sorted(path.name for path in (out / "overlays").iterdir())
    # Numbered by position among the inputs (sorted paths), so the failed one leaves a gap.
    assert overlays == ["00000_a_square.png", "00001_c_tall.png", "00003_b_wide.png"]

    detector = load_detector(artifact)
    pixels = torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255
    expected = detector(pixels)[0].numpy()
    for name, shift in (("a_square.png", 0), ("nested/b_wide.png", SIZE // 2)):
        rows = [r for r in table if r["image"] == str(images / name) and r["kind"] == "discovered"]
        found = np.array([[r["x"], r["y"]] for r in sorted(rows, key=lambda r: r["landmark"])])
        np.testing.assert_allclose(found, expected + np.float32([shift, 0]), atol=1e-4)


def test_parquet_and_the_exit_status_when_nothing_is_readable(artifact, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(random_picture(20, 20, 3)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    assert main([str(artifact), str(good), "--out", str(out), "--format", "parquet"]) == 0
    assert pyarrow.parquet.read_table(out / "landmarks.parquet").num_rows == K + L
    assert main([str(artifact), str(bad), "--out", str(tmp_path / "none")]) == 1
    assert "1 image found: 0 predicted, 1 failed (see the warnings above)" in (
        capsys.readouterr().out
    )


def test_unusable_arguments(artifact, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    assert main([str(artifact), str(tmp_path / "missing.png"), *out]) == 2
    assert "missing.png: no such file or folder" in capsys.readouterr().err
    image = tmp_path / "image.png"
    Image.fromarray(random_picture(SIZE, SIZE, 0)).save(image)
    assert main([str(tmp_path), str(image), *out]) == 2
    assert "not an exported detector (missing detector.pt2, metadata.json)" in (
        capsys.readouterr().err
    )
    empty = tmp_path / "empty"
    (empty / "nested").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    assert main([str(artifact), str(empty), *out]) == 2
    assert f"no images found in {empty}: expected image files or folders" in (
        capsys.readouterr().err
    )


def smooth_picture(height: int, width: int) -> np.ndarray:
    """Gradients and a bright blob: decoded at a reduced scale, it looks the same."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    blob = np.exp(-((x - 0.6) ** 2 + (y - 0.3) ** 2) / 0.02)
    channels = [x, y, blob]
    return (np.stack(channels, -1) * 255).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_a_large_image_gets_a_capped_overlay_and_landmarks_in_its_own_pixels(
    artifact, tmp_path, suffix
):
    picture = smooth_picture(2000, 3000)
    path = tmp_path / f"large{suffix}"
    Image.fromarray(picture).save(path)
    out = tmp_path / "out"
    assert main([str(artifact), str(path), "--out", str(out)]) == 0

    with Image.open(out / "overlays" / "00000_large.png") as overlay:
        assert overlay.size == (1024, 683)
    # The detector on the centred 2000 x 2000 square of the fully decoded image, mapped back
    # to the 3000 x 2000 image: a JPEG decoded at a reduced scale lands within a pixel or two.
    square = torch.from_numpy(picture[:, 500:2500]).permute(2, 0, 1)[None].float() / 255
    resized = torch.nn.functional.interpolate(square, (SIZE, SIZE), mode="area")
    expected = load_detector(artifact)(resized)[0].numpy() * (2000 / SIZE) + np.float32([500, 0])
    rows = pyarrow.csv.read_csv(out / "landmarks.csv").to_pylist()
    found = np.array([[r["x"], r["y"]] for r in rows if r["kind"] == "discovered"])
    np.testing.assert_allclose(found, expected, atol=4)
