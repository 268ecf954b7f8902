"""Volume files (krypton_fx.volumes), the N-d upsampling and the three-slice picture (krypton_fx.viz)."""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from krypton_fx import viz
from krypton_fx.volumes import (
    Intensity,
    VolumeFileError,
    is_volume_path,
    map_writer,
    read_volume,
    to_display_orientation,
    volume_suffix,
)

# An oblique-free but permuted and flipped affine: voxel axis i runs to the front, j to the
# patient's left, k up; anisotropic voxels.
AFFINE = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


def write_nifti(path, data, affine=AFFINE, slope=None):
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    img.header["cal_min"], img.header["cal_max"] = 0, 300
    if slope is not None:
        img.header.set_slope_inter(slope, 1.0)
    nib.save(img, path)
    return img


# --- reading --------------------------------------------------------------------------------


def test_nifti_is_read_channels_first_with_scaling_affine_and_zooms(tmp_path):
    data = np.arange(5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3)
    write_nifti(tmp_path / "scan.nii.gz", data, slope=2.0)
    vol = read_volume(tmp_path / "scan.nii.gz")
    assert vol.kind == "nifti" and vol.data.dtype == np.float32 and vol.data.shape == (1, 5, 4, 3)
    np.testing.assert_array_equal(vol.data[0], data * 2.0 + 1.0)  # scl_slope, scl_inter applied
    np.testing.assert_array_equal(vol.affine, AFFINE)
    assert vol.zooms == (1.5, 2.0, 3.0) and vol.spatial_shape == (5, 4, 3) and vol.channels == 1


def test_a_4d_nifti_has_its_channels_last_and_npy_first(tmp_path):
    data = np.random.default_rng(0).random((5, 4, 3, 2)).astype(np.float32)
    write_nifti(tmp_path / "two.nii", data)
    vol = read_volume(tmp_path / "two.nii")
    assert vol.data.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(vol.data[1], data[..., 1])
    np.save(tmp_path / "two.npy", np.moveaxis(data, -1, 0))
    npy = read_volume(tmp_path / "two.npy")
    assert npy.kind == "npy" and npy.data.shape == (2, 5, 4, 3) and npy.zooms == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(npy.affine, np.eye(4))
    np.save(tmp_path / "one.npy", data[..., 0].astype(np.int64))
    assert read_volume(tmp_path / "one.npy").data.shape == (1, 5, 4, 3)


def test_names():
    assert volume_suffix("a/B.NII.GZ") == ".nii.gz" and volume_suffix("x.nii") == ".nii"
    assert is_volume_path("v.npy") and not is_volume_path("scan.png") and not is_volume_path("scan.gz")


@pytest.mark.parametrize("case, words", [
    ("text.nii", "is not a NIfTI volume"),
    ("text.nii.gz", "is not a NIfTI volume"),
    ("text.npy", "is not a numpy .npy file"),
    ("truncated.nii.gz", "truncated or corrupt"),
    ("objects.npy", "holds Python objects"),
    ("nan.npy", "NaN or infinite voxels"),
    ("five_axes.npy", "has 5 axes"),
    ("missing.nii", "does not exist"),
    ("folder.nii", "is a directory"),
    ("strings.npy", "holds a <U1 array"),
])
def test_bad_files_raise_one_line(tmp_path, case, words):
    (tmp_path / "text.nii").write_text("not\na volume\n")
    (tmp_path / "text.nii.gz").write_text("not a volume\n")
    (tmp_path / "text.npy").write_text("not an array\n")
    write_nifti(tmp_path / "good.nii.gz", np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))
    whole = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(whole[:len(whole) // 2])  # the header reads, the data not
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "nan.npy", np.full((4, 4, 4), np.nan))
    np.save(tmp_path / "five_axes.npy", np.zeros((1, 1, 2, 2, 2)))
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    (tmp_path / "folder.nii").mkdir()
    with pytest.raises(VolumeFileError) as info:
        read_volume(tmp_path / case)
    assert words in str(info.value) and "\n" not in str(info.value)



def write_npy_header(path, shape, descr="<f4", data=b"", version=(1, 0)):
    """A .npy file whose header claims ``shape`` but which holds only ``data`` after it."""
    header = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
    write(header, {"descr": descr, "fortran_order": False, "shape": shape})
    path.write_bytes(header.getvalue() + data)


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_an_npy_header_that_claims_more_than_the_file_holds_is_refused_before_allocating(tmp_path, version):
    import tracemalloc

    path = tmp_path / "claims.npy"
    write_npy_header(path, (64, 512, 512), data=b"\0" * 200, version=version)  # claims 64 MiB, holds 200 bytes
    tracemalloc.start()
    try:
        with pytest.raises(VolumeFileError) as info:
            read_volume(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "truncated or corrupt: claims 67108864 bytes (a 64x512x512 float32 array), holds 200" in str(info.value)
    assert "\n" not in str(info.value)
    assert peak < 4 << 20, f"{peak} bytes allocated for a file of a few hundred"
    # the same array, whole, reads
    write_npy_header(path, (2, 3, 4), data=np.arange(24, dtype="<f4").tobytes(), version=version)
    np.testing.assert_array_equal(read_volume(path).data[0], np.arange(24, dtype=np.float32).reshape(2, 3, 4))

# --- intensity ------------------------------------------------------------------------------


def test_intensity_scalings():
    x = np.array([[[-10.0, 0.0, 30.0]]])
    assert Intensity.parse("none").apply(x).tolist() == x.tolist()
    np.testing.assert_allclose(Intensity.parse("minmax").apply(x), [[[0.0, 0.25, 1.0]]])
    z = Intensity.parse("ZSCORE").apply(x)
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-6
    np.testing.assert_allclose(Intensity.parse("window:-5,5").apply(x), [[[0.0, 0.5, 1.0]]])
    assert Intensity.parse("minmax").apply(np.ones((2, 2))).tolist() == [[0.0, 0.0], [0.0, 0.0]]  # flat
    assert str(Intensity.parse("window:-1000,400")) == "window:-1000,400"
    for bad in ("window:5", "window:5,1", "window:a,b", "window:0,inf", "minmax:1", "clip", ""):
        with pytest.raises(ValueError):
            Intensity.parse(bad)


def test_intensity_agrees_with_monai():
    transforms = pytest.importorskip("monai.transforms")
    x = np.random.default_rng(1).normal(100, 30, (2, 6, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(Intensity.parse("minmax").apply(x), transforms.ScaleIntensity()(x), atol=1e-6)
    np.testing.assert_allclose(Intensity.parse("zscore").apply(x), transforms.NormalizeIntensity()(x),
                               atol=1e-5)
    window = transforms.ScaleIntensityRange(a_min=80, a_max=120, b_min=0, b_max=1, clip=True)
    np.testing.assert_allclose(Intensity.parse("window:80,120").apply(x), window(x), atol=1e-6)


# --- maps -----------------------------------------------------------------------------------


def _written(write) -> bytes:
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["map.nii.gz", "map.nii"])
def test_a_nifti_map_keeps_the_inputs_grid_affine_and_spatial_header(tmp_path, name):
    write_nifti(tmp_path / "scan.nii.gz", np.zeros((5, 4, 3), np.int16), slope=2.0)
    vol = read_volume(tmp_path / "scan.nii.gz")
    values = np.random.default_rng(2).random((5, 4, 3))
    (tmp_path / name).write_bytes(_written(map_writer(values, vol, tmp_path / name, "krypton_fx: drop")))
    if name.endswith(".gz"):
        gzip.decompress((tmp_path / name).read_bytes())  # really gzipped
    out = nib.load(tmp_path / name)
    assert out.shape == (5, 4, 3) and out.get_data_dtype() == np.float32
    np.testing.assert_array_equal(out.affine, vol.affine)
    np.testing.assert_allclose(out.get_fdata(), values.astype(np.float32))
    hdr = out.header
    assert hdr.get_zooms() == (1.5, 2.0, 3.0) and hdr.get_xyzt_units() == ("mm", "sec")
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 2)
    assert float(hdr["cal_max"]) == 0.0  # the scan's display window is not the map's
    assert hdr["descrip"].tobytes().startswith(b"krypton_fx: drop")


def test_maps_of_npy_volumes_and_maps_as_npy(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((3, 4, 5), np.float32))
    vol = read_volume(tmp_path / "v.npy")
    values = np.arange(60, dtype=np.float64).reshape(3, 4, 5)
    back = np.load(io.BytesIO(_written(map_writer(values, vol, "m.npy"))))
    assert back.dtype == np.float32 and back.tolist() == values.tolist()
    (tmp_path / "m.nii").write_bytes(_written(map_writer(values, vol, "m.nii")))
    np.testing.assert_array_equal(nib.load(tmp_path / "m.nii").affine, np.eye(4))  # identity, as documented
    with pytest.raises(ValueError, match="not on the volume's grid"):
        map_writer(values[:2], vol, "m.npy")


def test_display_orientation_is_the_closest_canonical_one(tmp_path):
    data = np.random.default_rng(3).random((5, 4, 3)).astype(np.float32)
    img = write_nifti(tmp_path / "scan.nii", data)
    vol = read_volume(tmp_path / "scan.nii")
    view = to_display_orientation(vol)
    canonical = nib.as_closest_canonical(img)
    assert view.layout == "ras"
    np.testing.assert_array_equal(view.reorient(vol.data[0]), canonical.get_fdata(dtype=np.float32))
    assert view.zooms == tuple(float(z) for z in canonical.header.get_zooms())
    shown = view.reorient(vol.data[0])
    for voxel in [(0, 0, 0), (4, 3, 2), (1, 2, 0)]:
        assert shown[view.voxel_index(voxel)] == vol.data[0][voxel]
    assert view.file_axes == (1, 0, 2)  # x (left-right) runs along the file's j, y along i


# --- upsampling and the picture -------------------------------------------------------------


def test_upsample_nd_is_the_2d_upsampling_on_two_axes_and_trilinear_on_three():
    heat = np.random.default_rng(4).random((5, 7))
    np.testing.assert_allclose(viz.upsample_heatmap_nd(heat, (20, 30), (6, 4), (3, 4)),
                               viz.upsample_heatmap(heat, (20, 30), (6, 4), (3, 4)), atol=1e-12)
    # Patch 2, stride 2: cell centres sit between voxels 2i and 2i+1, where trilinear interpolation
    # with half-pixel centres (torch's align_corners=False) puts them as well.
    cube = np.random.default_rng(5).random((3, 4, 5))
    ours = viz.upsample_heatmap_nd(cube, (6, 8, 10), (2, 2, 2), (2, 2, 2))
    theirs = F.interpolate(torch.from_numpy(cube)[None, None], size=(6, 8, 10), mode="trilinear",
                           align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    with pytest.raises(ValueError, match="3-axis map needs 3"):
        viz.upsample_heatmap_nd(cube, (6, 8), (2, 2), (2, 2))


@pytest.mark.parametrize("layout", ["array", "ras"])
def test_volume_figure_draws_three_planes(layout):
    volume = np.random.default_rng(6).random((10, 12, 14))
    drop = np.zeros_like(volume)
    drop[4:7, 5:8, 6:9] = 0.5
    fig = viz.volume_figure(volume, drop, (5, 6, 7), 1, 0.9, layout=layout, spacing=(1.0, 2.0, 3.0),
                            label_name="lesion", box=(4, 5, 6, 3, 3, 3), plane_text=["i = 5", "j = 6", "k = 7"])
    assert len(fig.axes) == 10  # 3 planes x (image, overlay, map) and the colour bar
    title = fig._suptitle.get_text()
    assert "lesion (class 1): P = 0.900" in title and "strongest drop" in title
    shapes = [ax.images[0].get_array().shape for ax in fig.axes[:9:3]]
    expected = {"array": [(12, 14), (10, 14), (10, 12)], "ras": [(12, 10), (14, 10), (14, 12)]}[layout]
    assert shapes == expected
    with pytest.raises(ValueError, match="layout"):
        viz.volume_figure(volume, drop, (5, 6, 7), 1, 0.9, layout="lps")
