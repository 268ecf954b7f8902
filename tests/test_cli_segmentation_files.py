"""``krypton-fx explain FILES --out-dir DIR --target class:N``: a segmentation target over a folder of
pictures gives each image the map its own ``--out`` run gives, with a mask file or each image's
predicted mask; an image that does not read is an error row, the others go on."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from test_cli_volumes import run_cli

pytest.importorskip("monai.networks.nets")

UNET_2D = ["--model", "monai:UNet", "--spatial-dims", "2", "--in-channels", "1", "--num-classes", "2",
           "--weights", "none", "--size", "32", "--patch", "8", "--stride", "8", "--device", "cpu"]


def _picture(path, shape, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(path)


def test_a_folder_with_a_target_gives_each_image_its_own_runs_map(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(2):
        _picture(tmp_path / "in" / f"scan{i}.png", (32, 48), i)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a picture")
    roi = np.zeros((32, 32), np.uint8)
    roi[8:20, 10:30] = 255
    Image.fromarray(roi).save(tmp_path / "roi.png")
    proc = run_cli("explain", "in", *UNET_2D, "--target", "class:1", "--mask", "roi.png", "--out-dir", "out",
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 1, proc.stderr  # one image does not read
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        rows = {r["path"].split("/")[-1]: r for r in csv.DictReader(f)}
    assert rows["broken.png"]["status"] == "error"
    for i in range(2):
        assert rows[f"scan{i}.png"]["status"] == "ok" and rows[f"scan{i}.png"]["label"] == "1"
        assert (tmp_path / "out" / f"scan{i}.png").stat().st_size > 0
    one = run_cli("explain", "in/scan1.png", *UNET_2D, "--target", "class:1", "--mask", "roi.png",
                  "--out", "one.png", "--npy", "one.npy", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out" / "scan1.npy"), np.load(tmp_path / "one.npy"), atol=1e-6)
    # other target settings: the folder's maps are not reused, unless --overwrite redoes them
    again = ["explain", "in/scan0.png", *UNET_2D, "--target", "class:1", "--mask", "predicted", "--out-dir", "out"]
    refused = run_cli(*again, cwd=tmp_path)
    assert refused.returncode == 2 and "other settings (mask 'roi.png' -> 'predicted')" in refused.stderr
    redone = run_cli(*again, "--overwrite", cwd=tmp_path)
    assert redone.returncode == 0, redone.stderr
    one = run_cli("explain", "in/scan0.png", *UNET_2D, "--target", "class:1", "--out", "pred.png", "--npy",
                  "pred.npy", cwd=tmp_path)  # (--mask predicted is the default)
    assert one.returncode == 0, one.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out" / "scan0.npy"), np.load(tmp_path / "pred.npy"), atol=1e-6)
