"""`python -m ulm_dist.predict` on image folders, with an artifact exported from a tiny model
(the export of trained checkpoints is tested in test_export.py), with PyTorch and with
onnxruntime."""

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.csv
import pyarrow.parquet
import pytest
import torch
from PIL import Image

from ulm_dist.config import load_config
from ulm_dist.deploy.artifact import DETECTOR_NAME, README_NAME, Regressor, load_detector
from ulm_dist.deploy.export import export
from ulm_dist.deploy.onnx_detector import BATCH_NAME, ONNX_NAME, ONNX_OPSET, ONNX_TOLERANCE
from ulm_dist.deploy.predict import main
from ulm_dist.deploy.trained import TrainedModel
from ulm_dist.models import build_learner

SIZE, K, L = 16, 4, 3
# The real faces where this checkout sits beside ../shared (see tests/data/test_faces68.py).
FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "faces68-dev" / "img"


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


@pytest.fixture
def face_images(tmp_path) -> list[Path]:
    """8 real face crops (128 px JPEGs) where faces68-dev is present; else 8 synthetic
    pictures of several sizes, gradients and a blob, as JPEGs."""
    if FACES.is_dir():
        return sorted(FACES.glob("*.jpg"))[:8]
    paths = []
    for n in range(8):
        path = tmp_path / f"synthetic_{n}.jpg"
        Image.fromarray(np.roll(smooth_picture(96 + 8 * n, 128), 9 * n, axis=1)).save(path)
        paths.append(path)
    return paths


def landmark_table(artifact: Path, images: list[Path], out: Path, runtime: str) -> dict:
    """(image, kind, landmark) -> (x, y) from `predict` with `runtime`, in batches of 7 and 1."""
    argv = [str(artifact), *map(str, images), "--out", str(out), "--batch-size", "7"]
    assert main([*argv, "--runtime", runtime]) == 0
    rows = pyarrow.csv.read_csv(out / "landmarks.csv").to_pylist()
    return {(r["image"], r["kind"], r["landmark"]): (r["x"], r["y"]) for r in rows}


def test_onnxruntime_gives_pytorchs_landmarks_on_real_images(artifact, face_images, tmp_path):
    torch_rows = landmark_table(artifact, face_images, tmp_path / "torch", "torch")
    onnx_rows = landmark_table(artifact, face_images, tmp_path / "onnx", "onnx")
    assert onnx_rows.keys() == torch_rows.keys()
    assert len(onnx_rows) == len(face_images) * (K + L)
    overlays = sorted(path.name for path in (tmp_path / "onnx" / "overlays").iterdir())
    assert overlays == sorted(path.name for path in (tmp_path / "torch" / "overlays").iterdir())
    # ONNX_TOLERANCE is in [-1, 1] units of the detector's square, the image's short side.
    sides = {str(path): min(Image.open(path).size) for path in face_images}
    worst = 0.0
    for key, point in torch_rows.items():
        difference = np.abs(np.subtract(onnx_rows[key], point)).max() / (sides[key[0]] / 2)
        worst = max(worst, difference)
    print(f"ONNX vs PyTorch: largest landmark difference {worst:.3g} (normalised units)")
    assert worst <= ONNX_TOLERANCE
    # Not a comparison of two constant outputs: the landmarks differ between images.
    firsts = {point for (image, kind, landmark), point in torch_rows.items() if landmark == 0}
    assert len(firsts) > 1


def test_the_onnx_model_takes_batches_of_1_and_7_with_onnxruntime_alone(artifact):
    import onnx
    import onnxruntime

    model = onnx.load(artifact / ONNX_NAME)
    assert [opset.version for opset in model.opset_import if opset.domain == ""] == [ONNX_OPSET]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == BATCH_NAME

    onnx_detector = load_detector(artifact, runtime="onnx")
    torch_detector = load_detector(artifact)
    session = onnxruntime.InferenceSession(artifact / ONNX_NAME, providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        images = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        expected = torch_detector(images)
        found = onnx_detector(images)
        assert found.shape == (batch, K, 2)
        torch.testing.assert_close(found, expected, atol=ONNX_TOLERANCE * SIZE / 2, rtol=0)
        (raw,) = session.run(None, {"images": images.numpy()})
        np.testing.assert_allclose((raw + 1) * SIZE / 2, expected.numpy(), atol=1e-3)


def test_the_artifacts_readme_lines_run_with_onnxruntime(artifact, monkeypatch):
    readme = (artifact / README_NAME).read_text()
    section = readme[readme.index("## With onnxruntime alone") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "torch" not in code and len(code.strip().splitlines()) == 5
    monkeypatch.chdir(artifact)
    names: dict = {}
    exec(code, names)
    assert names["pixels"].shape == (4, K, 2)
    assert ((names["pixels"] >= 0) & (names["pixels"] <= SIZE)).all()


def test_a_corrupt_or_missing_onnx_file_gets_a_clear_error(artifact, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(random_picture(SIZE, SIZE, 0)).save(image)
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    (copy / ONNX_NAME).write_bytes((artifact / ONNX_NAME).read_bytes()[:200])  # cut short
    argv = [str(copy), str(image), "--out", str(tmp_path / "out"), "--runtime", "onnx"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"{copy / ONNX_NAME}: onnxruntime cannot load it as an ONNX model" in error
    assert "export the checkpoint again" in error

    (copy / ONNX_NAME).unlink()
    assert main(argv) == 2
    assert "the artifact was exported without ONNX" in capsys.readouterr().err
    assert not (tmp_path / "out" / "landmarks.csv").exists()


def test_a_folder_with_only_the_onnx_model_predicts_with_onnxruntime(artifact, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(random_picture(SIZE, SIZE, 0)).save(image)
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    (copy / DETECTOR_NAME).unlink()
    argv = [str(copy), str(image), "--out", str(tmp_path / "out")]
    assert main([*argv, "--runtime", "onnx"]) == 0
    assert len(pyarrow.csv.read_csv(tmp_path / "out" / "landmarks.csv")) == K + L
    capsys.readouterr()

    assert main([*argv, "--runtime", "torch"]) == 2
    error = capsys.readouterr().err
    assert f"{copy / DETECTOR_NAME}: no such file, and the torch runtime runs" in error
    assert f"the folder has {ONNX_NAME}: run it with --runtime onnx" in error
