"""``krypton-fx explain ... --target class:N`` on a segmentation network (MONAI's UNet by name), run as
a user runs it: the NIfTI map equals the API's, and bad segmentation options exit 2 with one line."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import torch
from test_cli_volumes import AFFINE, make_volume, run_cli, write_nifti

import krypton_fx
from krypton_fx.models import load_model
from krypton_fx.viz import upsample_heatmap_nd

pytest.importorskip("monai.networks.nets")

UNET_3D = ["--model", "monai:UNet", "--spatial-dims", "3", "--in-channels", "1", "--num-classes", "2",
           "--weights", "none", "--patch", "16", "--stride", "16", "--device", "cpu"]


def test_a_segmentation_map_of_a_nifti_volume_equals_the_api(tmp_path):
    volume = make_volume((32, 32, 32))  # (MONAI's UNet halves four times; instance norm needs 2 voxels)
    write_nifti(tmp_path / "scan.nii.gz", volume)
    roi = np.zeros((32, 32, 32), np.float32)
    roi[4:12, 2:9, 6:14] = 1
    write_nifti(tmp_path / "roi.nii.gz", roi)
    proc = run_cli("explain", "scan.nii.gz", *UNET_3D, "--target", "class:1", "--mask", "roi.nii.gz", "--out",
                   "heat.png", "--npy", "heat.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "over the mask" in proc.stdout
    model = load_model("monai:UNet", "none", num_classes=2, spatial_dims=3, in_channels=1).model.eval()
    x = torch.from_numpy(volume)[None]
    target = krypton_fx.SegmentationTarget(1, mask=torch.from_numpy(roi))
    ref = krypton_fx.naive_occlusion(model, x, (16, 16, 16), (16, 16, 16), float(volume.min()),
                                    target=target)
    heat = np.load(tmp_path / "heat.npy")
    np.testing.assert_allclose(heat, ref.heatmap.numpy(), atol=1e-5)
    drop = ref.base_prob - upsample_heatmap_nd(ref.heatmap.numpy(), (32, 32, 32), (16, 16, 16), (16, 16, 16))
    written = nib.load(tmp_path / "heat-map.nii.gz")
    np.testing.assert_allclose(np.asarray(written.dataobj), drop, atol=1e-5)
    np.testing.assert_allclose(written.affine, AFFINE)


_BAD = {
    "mask of another shape": (["--target", "class:1", "--mask", "small.npy"], "has shape 8x32x32"),
    "class out of range": (["--target", "class:2"], "out of range"),
    "mask without target": (["--mask", "small.npy"], "add --target"),
    "label with target": (["--target", "class:1", "--label", "0"], "with --target class:N"),
    "bad target": (["--target", "1"], "class:N"),
    "classifier with target": (["--target", "class:1", "--model", "monai:resnet18"], "dense map"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad case run once, two at a time (each subprocess pays torch's and MONAI's import)."""
    root = tmp_path_factory.mktemp("seg")
    np.save(root / "scan.npy", make_volume((32, 32, 32)))
    np.save(root / "small.npy", np.ones((8, 32, 32), np.float32))

    def run(case):
        out = f"{case.replace(' ', '-')}.png"
        return run_cli("explain", "scan.npy", *UNET_3D, *_BAD[case][0], "--out", out, cwd=root), root / out

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(sorted(_BAD), pool.map(run, sorted(_BAD))))


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_segmentation_options_exit_2_with_one_line(case, bad_runs):
    proc, out = bad_runs[case]
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and _BAD[case][1] in lines[0], proc.stderr
    assert not out.exists()
