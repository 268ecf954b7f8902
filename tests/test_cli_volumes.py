"""``krypton-fx explain`` on volumes (NIfTI, ``.npy``) and MONAI networks by name, and ``krypton-fx
demo --volume``, run as a user runs them: ``python -m krypton_fx ...``.

The bad-input cases run together, two at a time, from one module-scoped fixture (each
subprocess pays torch's import, and MONAI's where it builds a network).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import krypton_fx
from krypton_fx.viz import upsample_heatmap_nd

nets = pytest.importorskip("monai.networks.nets")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Voxel axis i runs to the front, j to the patient's left, k up; anisotropic voxels.
AFFINE = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
RESNET_3D = ["--model", "monai:resnet18", "--spatial-dims", "3", "--in-channels", "1", "--num-classes", "2",
             "--weights", "none", "--patch", "8", "--stride", "4", "--device", "cpu"]


def run_cli(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "krypton_fx", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def make_volume(shape=(16, 16, 16), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 100).astype(np.float32)
    data[4:9, 3:8, 8:13] += 300  # something to look at
    return data


def write_nifti(path: Path, data: np.ndarray) -> None:
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_qform(AFFINE, code=1)
    img.header.set_sform(AFFINE, code=2)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def picture_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as picture:
        picture.load()
        return picture.size


def minmax(x: np.ndarray) -> np.ndarray:
    return ((x - x.min()) / (x.max() - x.min())).astype(np.float32)


# --- what works ------------------------------------------------------------------------------


def test_a_nifti_volume_gives_a_picture_and_a_map_on_its_grid_equal_to_the_api(tmp_path):
    data = make_volume()
    write_nifti(tmp_path / "scan.nii.gz", data)
    proc = run_cli("explain", "scan.nii.gz", *RESNET_3D, "--intensity", "minmax", "--color", "black",
                   "--out", "scan-heat.png", "--npy", "cells.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "random weights" in proc.stderr
    assert "wrote scan-heat-map.nii.gz (drop in P on the input's grid, NIfTI, the input's affine)" in proc.stdout

    width, height = picture_size(tmp_path / "scan-heat.png")
    assert 700 <= width <= 2000 and 700 <= height <= 2000  # three rows of three panels

    torch.manual_seed(0)  # the CLI's --seed default: the same random initialisation
    model = nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2)
    x = torch.from_numpy(minmax(data))[None]
    ex = krypton_fx.compile(model, patch=8, stride=4, color=0.0, image_size=(16, 16, 16), channels=1)
    res = ex(x)
    cells = np.load(tmp_path / "cells.npy")
    assert cells.shape == (3, 3, 3)
    np.testing.assert_allclose(cells, res.heatmap.numpy(), rtol=0, atol=1e-5)

    scan, heat = nib.load(tmp_path / "scan.nii.gz"), nib.load(tmp_path / "scan-heat-map.nii.gz")
    assert heat.shape == scan.shape == (16, 16, 16)
    np.testing.assert_array_equal(heat.affine, scan.affine)
    assert heat.header.get_zooms() == scan.header.get_zooms() == (1.5, 2.0, 3.0)
    assert (int(heat.header["qform_code"]), int(heat.header["sform_code"])) == (1, 2)
    drop = res.base_prob - upsample_heatmap_nd(res.heatmap.numpy(), (16, 16, 16), (8, 8, 8), (4, 4, 4))
    np.testing.assert_allclose(heat.get_fdata(), drop, rtol=0, atol=1e-5)
    hottest = tuple(int(v) for v in np.unravel_index(int(np.argmax(drop)), drop.shape))
    assert f"strongest drop {drop.max():.4f} at voxel {hottest}" in proc.stdout


def test_an_npy_volume_with_channels_gets_an_npy_map(tmp_path):
    data = np.stack([make_volume(seed=1), make_volume(seed=2)]) / 400.0
    np.save(tmp_path / "two.npy", data)
    proc = run_cli("explain", "two.npy", "--model", "monai:resnet10", "--num-classes", "3", "--weights", "none",
                   "--patch", "8", "--stride", "8", "--color", "mean", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "(16x16x16 voxels, 2 channels, intensity none)" in proc.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"two.npy", "heat.png", "heat-map.npy"}

    torch.manual_seed(0)  # --in-channels and --spatial-dims default to the volume's: 2 channels, 3-D
    model = nets.resnet10(spatial_dims=3, n_input_channels=2, num_classes=3)
    x = torch.from_numpy(data.astype(np.float32))
    res = krypton_fx.compile(model, patch=8, stride=8, color=float(x.double().mean()), image_size=(16, 16, 16),
                             channels=2)(x)
    drop = res.base_prob - upsample_heatmap_nd(res.heatmap.numpy(), (16, 16, 16), (8, 8, 8), (8, 8, 8))
    heat = np.load(tmp_path / "heat-map.npy")
    assert heat.shape == (16, 16, 16) and heat.dtype == np.float32
    np.testing.assert_allclose(heat, drop, rtol=0, atol=1e-5)


def test_a_2d_image_with_a_monai_network(tmp_path):
    rng = np.random.default_rng(0)
    pixels = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    pixels[8:20, 10:22] = (230, 40, 40)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    proc = run_cli("explain", "scan.png", "--model", "monai:resnet18", "--num-classes", "2", "--weights", "none",
                   "--size", "32", "--patch", "8", "--stride", "8", "--npy", "heat.npy", "--device", "cpu",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    width, height = picture_size(tmp_path / "heat.png")
    assert width > height  # the 2-D figure: three panels side by side

    torch.manual_seed(0)  # --spatial-dims 2 and --in-channels 3 for an RGB image
    model = nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=2)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    gray = [(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    res = krypton_fx.compile(model, patch=8, stride=8, color=gray, image_size=(32, 32))(x)
    np.testing.assert_allclose(np.load(tmp_path / "heat.npy"), res.heatmap.numpy(), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_volume_demo_trains_explains_and_finds_every_lesion(tmp_path):
    proc = run_cli("demo", "--volume", "--out", "demo", "--cache-dir", "cache", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cache" / "lesion-tiny3d-24.pt").exists()
    rows = re.findall(r"^\d\s+(\d\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+\d+\.\d+x\s+(\S+)\s+(yes|no) ", proc.stdout, re.M)
    assert len(rows) == 3, proc.stdout
    for prob, _, _, diff, inside in rows:
        assert float(prob) > 0.5 and float(diff) < 1e-4 and inside == "yes", proc.stdout
    assert re.search(r"held-out accuracy 0\.9\d+; at 32\^3: (0\.9\d+|1\.000)", proc.stdout), proc.stdout
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "demo-volume-0.png", "demo-volume-1.png", "demo-volume-2.png", "volume-0.npy", "volume-1.npy",
        "volume-2.npy"]
    # The command the demo suggests explains the volume it wrote, with the cached model.
    suggested = re.search(r"explain one yourself: krypton-fx (explain .*)$", proc.stdout, re.M).group(1).split()
    again = run_cli(*suggested, cwd=tmp_path, env={"KRYPTON_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr
    assert "class 1" in again.stdout and (tmp_path / "volume-0-map.npy").exists()


# --- bad input: exit 2, one line on stderr, no traceback, no output file ---------------------

VOLUME = ["--model", "monai:resnet18", "--num-classes", "2", "--weights", "none", "--device", "cpu"]
BAD_INPUTS = {
    "not a volume (NIfTI)": (["explain", "in/text.nii.gz", *VOLUME], "is not a NIfTI volume"),
    "not a volume (npy)": (["explain", "in/text.npy", *VOLUME], "is not a numpy .npy file"),
    "unreadable file (truncated)": (["explain", "in/truncated.nii.gz", *VOLUME], "truncated or corrupt"),
    "unreadable file (a folder)": (["explain", "in/folder.nii", *VOLUME], "is a directory"),
    "unreadable file (no permission)": (["explain", "in/locked.nii.gz", *VOLUME], "permission denied"),
    "missing volume": (["explain", "in/nope.nii.gz", *VOLUME], "does not exist"),
    "NaN voxels": (["explain", "in/nan.npy", *VOLUME], "NaN or infinite voxels"),
    "an npy header that claims more than the file holds": (
        ["explain", "in/claims.npy", *VOLUME], "truncated or corrupt: claims 256000000000 bytes"),
    "a 2-D model for a volume": (["explain", "in/scan.nii.gz", "--model", "resnet18", "--weights", "none"],
                                 "resnet18 takes 2-D images"),
    "a 2-D MONAI network for a volume": (["explain", "in/scan.nii.gz", *VOLUME, "--spatial-dims", "2"],
                                         "use --spatial-dims 3"),
    "a volume with two axes": (["explain", "in/flat.npy", *VOLUME], "holds a 16x16 array (2 axes)"),
    "a 3-D MONAI network for an image": (["explain", "in/scan.png", *VOLUME, "--spatial-dims", "3"],
                                         "takes volumes, but in/scan.png is a 2-D image"),
    "a 3-D model for an image": (["explain", "in/scan.png", "--model", "krypton_fx.lesions3d:Tiny3DNet"],
                                 "takes volumes (its first convolution is 3-D)"),
    "a MONAI network that does not exist": (["explain", "in/scan.nii.gz", "--model", "monai:resnet19"],
                                            "did you mean monai:resnet18"),
    "MONAI not installed": (["explain", "in/scan.nii.gz", *VOLUME], "pip install 'krypton_fx[monai]'"),
    "channels that do not fit": (["explain", "in/two.npy", *VOLUME, "--in-channels", "1"],
                                 "has 2 channel(s) but monai:resnet18 takes 1"),
    "a bad intensity window": (["explain", "in/scan.nii.gz", *VOLUME, "--intensity", "window:5"],
                               "--intensity: expected window:LO,HI"),
    "a map that is no volume file": (["explain", "in/scan.nii.gz", *VOLUME, "--map", "heat.png"],
                                     "a map is written as .nii, .nii.gz"),
    "the map is the input": (["explain", "in/scan.nii.gz", *VOLUME, "--map", "in/scan.nii.gz"],
                             "never overwrites an input"),
    "intensity for an image": (["explain", "in/scan.png", *VOLUME, "--intensity", "minmax"],
                               "--intensity applies to volumes"),
    "size for a volume": (["explain", "in/scan.nii.gz", *VOLUME, "--size", "64"], "--size applies to images"),
    "a volume into --out-dir": (["explain", "in/scan.nii.gz", *VOLUME, "--out-dir", "maps"],
                                "--out-dir explains images"),
    "a 2-D patch for a volume": (["explain", "in/scan.nii.gz", *VOLUME, "--patch", "8x8"],
                                 "--patch 8x8 has 2 values but the input has 3 spatial axes"),
    "a patch larger than the volume": (["explain", "in/scan.nii.gz", *VOLUME, "--patch", "17"],
                                       "--patch 17x17x17 is larger than the 16x16x16 model input"),
    "demo --size without --volume": (["demo", "--size", "48", "--out", "demo"], "add --volume"),
}


def _skip_reason(case: str):
    if case == "unreadable file (no permission)" and (not hasattr(os, "geteuid") or os.geteuid() == 0):
        return "root (or no POSIX permissions) can read a chmod 000 file"
    return None


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_volumes")
    inputs = root / "shared_inputs"
    inputs.mkdir()
    write_nifti(inputs / "scan.nii.gz", make_volume())
    (inputs / "text.nii.gz").write_text("not\na volume\n")
    (inputs / "text.npy").write_text("not an array\n")
    whole = (inputs / "scan.nii.gz").read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(whole[:len(whole) // 2])
    (inputs / "folder.nii").mkdir()
    write_nifti(inputs / "locked.nii.gz", make_volume())
    os.chmod(inputs / "locked.nii.gz", 0)
    np.save(inputs / "nan.npy", np.full((16, 16, 16), np.nan))
    header = io.BytesIO()  # a (4000, 4000, 4000) float32 header on a file of a few hundred bytes
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (4000, 4000, 4000)})
    (inputs / "claims.npy").write_bytes(header.getvalue() + bytes(200))
    np.save(inputs / "flat.npy", np.zeros((16, 16)))
    np.save(inputs / "two.npy", np.stack([make_volume(), make_volume(seed=1)]))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(inputs / "scan.png")
    fake = root / "no_monai" / "monai"  # a monai that fails to import, as if not installed
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named monai')\n")

    def run(case: str):
        cwd = root / re.sub(r"\W+", "_", case)
        cwd.mkdir()
        (cwd / "in").symlink_to(inputs, target_is_directory=True)
        env = None
        if case == "MONAI not installed":
            env = {"PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
        before = files_under(cwd)
        proc = run_cli(*BAD_INPUTS[case][0], cwd=cwd, env=env)
        return case, proc, files_under(cwd) - before

    cases = [c for c in BAD_INPUTS if _skip_reason(c) is None]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return {case: (proc, new) for case, proc, new in pool.map(run, cases)}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, bad_input_runs):
    if _skip_reason(case):
        pytest.skip(_skip_reason(case))
    proc, new_files = bad_input_runs[case]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("krypton-fx: error: "), lines
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not new_files, f"left behind: {sorted(map(str, new_files))}"
    assert BAD_INPUTS[case][1] in lines[0], lines[0]
