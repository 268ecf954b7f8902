"""``krypton-fx explain IMAGE --segments ...``: feature ablation on the command line, run as a user
runs it; the scores equal the API's, bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from test_cli import IMAGENET_MEAN, IMAGENET_STD, files_under, model_input, run_cli, write_test_image

import krypton_fx
from krypton_fx import segments

BASE = ["--model", "resnet18", "--weights", "none", "--size", "32", "--device", "cpu"]


def write_labels(path, size: int = 32) -> np.ndarray:
    labels = np.kron(np.arange(4).reshape(2, 2), np.ones((size // 2, size // 2))).astype(np.uint8) * 60
    Image.fromarray(labels).save(path)
    return labels


def api_scores(image, labels, color="gray"):
    torch.manual_seed(0)  # the CLI's --seed default
    model = torchvision.models.get_model("resnet18", weights=None).eval()
    level = 0.5 if color == "gray" else 0.0
    baseline = torch.tensor([(level - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
    ex = krypton_fx.compile(model, patch=1, stride=32, image_size=32)
    return ex.ablate(model_input(image), labels, baseline=baseline).scores.numpy()


def test_label_file_scores_equal_the_api_and_out_dir_agrees(tmp_path):
    image = tmp_path / "scan.png"
    write_test_image(image, size=32)
    labels = write_labels(tmp_path / "labels.png")
    proc = run_cli("explain", image, *BASE, "--segments", f"file:{tmp_path / 'labels.png'}", "--out", "seg.png",
                   "--npy", "seg.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 segments" in proc.stdout
    scores = np.load(tmp_path / "seg.npy")
    expected = api_scores(image, segments.consecutive(labels))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    with Image.open(tmp_path / "seg.png") as picture:
        assert picture.size[0] > picture.size[1]
    # The same through --out-dir (a worker per device): the same scores, a summary row.
    proc = run_cli("explain", image, *BASE, "--segments", f"file:{tmp_path / 'labels.png'}", "--out-dir", "maps",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "maps" / "scan.npy"), expected, rtol=0, atol=1e-5)
    assert (tmp_path / "maps" / "scan.png").exists() and "ok" in (tmp_path / "maps" / "summary.csv").read_text()


def test_slic_segments_as_the_api_draws_them(tmp_path):
    image = tmp_path / "scan.png"
    write_test_image(image, size=32)
    proc = run_cli("explain", image, *BASE, "--segments", "slic:6", "--color", "black", "--npy", "seg.npy",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    x = model_input(image)
    display = (x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).clamp(0, 1)
    labels = segments.slic(display.double(), n_segments=6)
    np.testing.assert_allclose(np.load(tmp_path / "seg.npy"), api_scores(image, labels, "black"), rtol=0, atol=1e-5)


BAD = {
    "slic-0": (["--segments", "slic:0"], "expected slic:N"),
    "unknown-kind": (["--segments", "watershed:3"], "expected slic:N"),
    "stride": (["--segments", "slic:8", "--stride", "4"], "--stride sets the sliding patch"),
    "drill-down": (["--segments", "slic:8", "--drill-down", "0.1"], "--drill-down sets the sliding patch"),
    "missing-file": (["--segments", "file:missing.png"], "does not exist"),
    "wrong-size": (["--segments", "file:small.png"], "the labels are 8x8"),
    "target": (["--segments", "slic:8", "--target", "class:1"], "--target explains a segmentation model"),
    "frozen-norms": (["--segments", "slic:8", "--norm-stats", "frozen"], "--norm-stats frozen applies"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad case, launched a few at a time (each pays torch's import): name -> (process, changed files)."""
    def launch(name):
        root = tmp_path_factory.mktemp(name)
        write_test_image(root / "scan.png", size=32)
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "small.png")
        before = files_under(root)
        proc = run_cli("explain", root / "scan.png", *BASE, *BAD[name][0], "--out", "seg.png", cwd=root)
        return name, (proc, files_under(root) ^ before)

    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(launch, BAD))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_segments_exit_2_with_one_line_and_write_nothing(case, bad_runs):
    proc, changed = bad_runs[case]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert BAD[case][1] in lines[-1] and lines[-1].startswith("krypton-fx: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not changed


def test_label_volume_scores_equal_the_api(tmp_path):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("monai")
    from krypton_fx.models import load_model

    rng = np.random.default_rng(0)
    volume = rng.random((12, 12, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "scan.nii.gz")
    labels = np.kron(np.arange(8).reshape(2, 2, 2), np.ones((6, 6, 6))).astype(np.int16) * 3
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "atlas.nii.gz")
    proc = run_cli("explain", tmp_path / "scan.nii.gz", "--model", "monai:resnet10", "--weights", "none",
                   "--num-classes", "2", "--device", "cpu", "--segments", f"file:{tmp_path / 'atlas.nii.gz'}",
                   "--out", "seg.png", "--npy", "seg.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "seg-map.nii.gz").exists()
    model = load_model("monai:resnet10", "none", 2, 0, spatial_dims=3, in_channels=1).model.eval()
    x = torch.from_numpy(volume)[None]
    ex = krypton_fx.compile(model, patch=1, stride=12, image_size=(12, 12, 12))
    expected = ex.ablate(x, torch.from_numpy(labels.astype(np.int64)), baseline=float(volume.min())).scores
    np.testing.assert_allclose(np.load(tmp_path / "seg.npy"), expected.numpy(), rtol=0, atol=1e-5)
