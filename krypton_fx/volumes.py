"""Volumes from files and occlusion maps back onto them: NIfTI (``.nii``, ``.nii.gz``, via
nibabel) and numpy ``.npy``; intensity scaling; the orientation a picture shows them in.

A :class:`Volume` holds the data channels first, ``(C, I, J, K)``, in the
file's own voxel order (nibabel's, which MONAI's ``LoadImage`` keeps too), so
that a map computed on it lies on the file's voxel grid and overlays the scan
once saved with the file's affine (:func:`map_writer`). A ``.npy`` file holds
``(D, H, W)`` or ``(C, D, H, W)``; its affine is the identity.

nibabel is imported when a NIfTI file is read or written (``pip install
'krypton_fx[monai]'`` brings it).

Example:
    >>> import numpy as np
    >>> np.save("/tmp/vol.npy", np.arange(64, dtype=np.float32).reshape(4, 4, 4))
    >>> vol = read_volume("/tmp/vol.npy")
    >>> vol.data.shape, vol.kind, vol.spatial_dims
    ((1, 4, 4, 4), 'npy', 3)
    >>> Intensity.parse("window:0,63").apply(vol.data).max()
    np.float32(1.0)
"""

from __future__ import annotations

import dataclasses
import gzip
import math
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Union

import numpy as np

__all__ = ["Volume", "VolumeFileError", "Intensity", "read_volume", "volume_suffix", "is_volume_path",
           "map_writer", "to_display_orientation", "DisplayView", "VOLUME_SUFFIXES", "INTENSITY_CHOICES"]

#: File endings read as volumes (and written as maps).
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy")
#: What ``--intensity`` takes.
INTENSITY_CHOICES = "none, minmax, zscore or window:LO,HI"

PathLike = Union[str, Path]


class VolumeFileError(ValueError):
    """A volume file cannot be read: the message is one line with the reason and the fix."""


def volume_suffix(path: PathLike) -> Optional[str]:
    """``".nii.gz"``, ``".nii"`` or ``".npy"`` (case-insensitive), or None for anything else.

    Example:
        >>> volume_suffix("scan.NII.GZ"), volume_suffix("scan.png")
        ('.nii.gz', None)
    """
    name = Path(path).name.lower()
    return next((s for s in (".nii.gz", ".nii", ".npy") if name.endswith(s)), None)


def is_volume_path(path: PathLike) -> bool:
    """Whether ``path`` names a volume file by its ending (the file need not exist)."""
    return volume_suffix(path) is not None


@dataclasses.dataclass(frozen=True)
class Volume:
    """A volume as read from a file.

    Attributes:
        data: float32 ``(C, *spatial)``, channels first, the file's voxel order.
        affine: ``(4, 4)`` voxel index -> world (mm) of a NIfTI file; the identity for ``.npy``.
        zooms: voxel size along each spatial axis (1 for ``.npy``).
        header: the NIfTI header (its spatial fields are copied onto maps), or None.
        path: where it was read from.
    """

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, ...]
    header: Any
    path: str

    @property
    def kind(self) -> str:
        return "npy" if self.header is None else "nifti"

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.data.shape[1:])

    @property
    def spatial_dims(self) -> int:
        return self.data.ndim - 1


def _shape_text(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = text or type(e).__name__
    return text if len(text) <= 140 else text[:137].rsplit(" ", 1)[0] + " ..."


def _check_finite(data: np.ndarray, path: PathLike) -> np.ndarray:
    bad = int(data.size - np.isfinite(data).sum())
    if bad:
        raise VolumeFileError(f"{path} has {bad} NaN or infinite voxels; the model cannot run on them: "
                              "replace them (with the background value, say) and save the volume again")
    return data


def _check_npy_size(path: Path) -> None:
    """Compare the size the ``.npy`` header claims with what the file holds, before ``np.load``
    allocates the claimed array (a corrupt header of a few hundred bytes can claim terabytes)."""
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            if version not in readers:
                return  # a newer header version: np.load knows it, and checks it as it reads
            shape, _, dtype = readers[version](f)
        except ValueError as e:
            raise VolumeFileError(f"{path} is not a numpy .npy file ({_reason(e)}); save the volume with "
                                  "np.save") from None
        data_start = f.tell()
    if dtype.hasobject:
        return  # no fixed size: np.load refuses it below, with its own reason
    claimed = math.prod(int(n) for n in shape) * dtype.itemsize
    holds = path.stat().st_size - data_start
    if holds < claimed:
        raise VolumeFileError(f"{path} is truncated or corrupt: claims {claimed} bytes (a {_shape_text(shape)} "
                              f"{dtype} array), holds {holds}; save the volume again with np.save")


def _read_npy(path: Path) -> Volume:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":  # np.load would try it as a pickle and blame pickling
        raise VolumeFileError(f"{path} is not a numpy .npy file (no .npy header); save the volume with "
                              "np.save(path, array)")
    _check_npy_size(path)
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise VolumeFileError(f"{path} holds Python objects, not a numeric array; save the volume with "
                                  "np.save(path, array) from a float or integer array") from None
        raise VolumeFileError(f"{path} is not a numpy .npy file ({_reason(e)}); save the volume with "
                              "np.save") from None
    except (EOFError, OSError) as e:
        raise VolumeFileError(f"cannot read {path}: {_reason(e)} (a truncated or corrupt .npy file?)") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise VolumeFileError(f"{path} holds a {getattr(array, 'dtype', type(array).__name__)} array; "
                              "a volume holds numbers (float or integer)")
    if array.ndim < 1 or array.ndim > 4:
        raise VolumeFileError(f"{path} has {array.ndim} axes ({_shape_text(array.shape)}); a volume is "
                              "(D, H, W) or (C, D, H, W)")
    data = array.astype(np.float32)
    data = data[None] if array.ndim <= 3 else data  # (D, H, W): one channel
    spatial = data.ndim - 1
    return Volume(_check_finite(data, path), np.eye(4), (1.0,) * spatial, None, str(path))


def _read_nifti(path: Path) -> Volume:
    try:
        import nibabel as nib
    except ImportError:
        raise VolumeFileError(f"reading {path} needs nibabel: pip install 'krypton_fx[monai]' "
                              "(or pip install nibabel)") from None
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VolumeFileError(f"{path} is a {type(img).__name__}, not a NIfTI volume")
        array = np.asarray(img.get_fdata(dtype=np.float32))
    except VolumeFileError:
        raise
    except nib.filebasedimages.ImageFileError as e:
        raise VolumeFileError(f"{path} is not a NIfTI volume ({_reason(e)}); give a .nii or .nii.gz file "
                              "(or a .npy array)") from None
    except Exception as e:  # gzip's OSError/EOFError, a short data block's ValueError, ...
        raise VolumeFileError(f"cannot read {path}: {type(e).__name__}: {_reason(e)} (a truncated or corrupt "
                              "NIfTI file?)") from None
    # NIfTI keeps channels (and time) after the three spatial axes; a vector image puts them on
    # the fifth axis with a 1 on the fourth.
    if array.ndim == 5 and array.shape[3] == 1:
        array = array[:, :, :, 0]
    if array.ndim > 4:
        raise VolumeFileError(f"{path} has {array.ndim} axes ({_shape_text(array.shape)}); a volume has 3 "
                              "spatial axes and at most one more for channels")
    data = np.moveaxis(array, -1, 0) if array.ndim == 4 else array[None]
    spatial = data.ndim - 1
    zooms = tuple(float(z) for z in img.header.get_zooms()[:spatial])
    return Volume(np.ascontiguousarray(_check_finite(data, path)), np.asarray(img.affine, dtype=np.float64),
                  zooms, img.header, str(path))


def read_volume(path: PathLike) -> Volume:
    """Read a NIfTI (``.nii``, ``.nii.gz``) or ``.npy`` volume, channels first, as float32.

    NIfTI: 3 axes, or 4 with channels last (a 5-D vector image's channels
    too); scaling (``scl_slope``) applied. ``.npy``: ``(D, H, W)`` or
    ``(C, D, H, W)`` (fewer axes are read as they are, so that the caller can
    say what the model needs).

    Raises:
        VolumeFileError: missing, unreadable, not a volume, truncated, or NaN/inf voxels.
    """
    path = Path(path).expanduser()
    suffix = volume_suffix(path)
    if suffix is None:
        raise VolumeFileError(f"{path}: not a volume file name; give a .nii, .nii.gz or .npy file")
    if not path.exists():
        raise VolumeFileError(f"{path} does not exist; check the path")
    if path.is_dir():
        raise VolumeFileError(f"{path} is a directory, not a volume file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise VolumeFileError(f"cannot read {path}: {e.strerror or _reason(e)}") from None
    return _read_npy(path) if suffix == ".npy" else _read_nifti(path)


# --- intensity scaling -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Intensity:
    """How voxel values become model inputs (applied over the whole volume, all channels).

    ``none``: as stored. ``minmax``: to ``[0, 1]`` by the volume's own minimum
    and maximum (MONAI's ``ScaleIntensity()``). ``zscore``: minus the mean,
    over the standard deviation (MONAI's ``NormalizeIntensity()``).
    ``window:LO,HI``: clipped to ``[LO, HI]`` and mapped to ``[0, 1]`` (a CT
    window in Hounsfield units, say; MONAI's ``ScaleIntensityRange`` with
    ``clip=True``).

    Example:
        >>> Intensity.parse("window:-1000,400").apply(np.array([-2000.0, 400.0, 1000.0])).tolist()
        [0.0, 1.0, 1.0]
    """

    kind: str = "none"
    low: float = 0.0
    high: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Intensity":
        """``none``, ``minmax``, ``zscore`` or ``window:LO,HI``; raises ``ValueError`` otherwise."""
        name, _, rest = text.strip().lower().partition(":")
        if name in ("none", "minmax", "zscore") and not rest:
            return cls(name)
        if name == "window":
            parts = rest.split(",")
            try:
                low, high = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
            except ValueError:
                low = high = math.nan
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"expected window:LO,HI with two finite numbers, got {text!r}")
            if high <= low:
                raise ValueError(f"window:LO,HI needs LO < HI, got {text!r}")
            return cls("window", low, high)
        raise ValueError(f"expected {INTENSITY_CHOICES}, got {text!r}")

    def apply(self, data: np.ndarray) -> np.ndarray:
        """The scaled volume, float32."""
        x = np.asarray(data, dtype=np.float64)
        if self.kind == "minmax":
            span = float(x.max() - x.min()) if x.size else 0.0
            x = (x - x.min()) / span if span > 0 else np.zeros_like(x)
        elif self.kind == "zscore":
            std = float(x.std()) if x.size else 0.0
            x = (x - x.mean()) / std if std > 0 else x - x.mean()
        elif self.kind == "window":
            x = (np.clip(x, self.low, self.high) - self.low) / (self.high - self.low)
        return x.astype(np.float32)

    def __str__(self) -> str:
        return f"window:{self.low:g},{self.high:g}" if self.kind == "window" else self.kind


# --- maps on the input's grid ------------------------------------------------------------------


def map_writer(values: np.ndarray, like: Volume, path: PathLike,
               description: str = "") -> Callable[[BinaryIO], None]:
    """A function writing ``values`` (on ``like``'s spatial grid) to a binary file, by ``path``'s ending.

    ``.nii`` / ``.nii.gz``: float32 NIfTI with ``like``'s affine and a copy of
    its header's spatial fields (voxel sizes, units, qform/sform codes); the
    display range is cleared, since the scan's window means nothing for a map.
    A ``.npy`` input has no header: its map gets the identity affine. ``.npy``:
    the float32 array (the affine is dropped).

    Example:
        >>> vol = read_volume("/tmp/vol.npy")
        >>> write = map_writer(np.zeros((4, 4, 4)), vol, "/tmp/map.npy")
        >>> with open("/tmp/map.npy", "wb") as f:
        ...     write(f)
    """
    values = np.asarray(values, dtype=np.float32)
    if values.shape != like.spatial_shape:
        raise ValueError(f"map of shape {values.shape} is not on the volume's grid {like.spatial_shape}")
    suffix = volume_suffix(path)
    if suffix == ".npy":
        return lambda f: np.save(f, values)
    if suffix is None:
        raise ValueError(f"{path}: a map is written as .nii, .nii.gz or .npy")
    import nibabel as nib

    header = like.header.copy() if like.header is not None else None
    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(values, like.affine, header=header)
    hdr = img.header
    hdr.set_data_dtype(np.float32)
    hdr["cal_min"] = hdr["cal_max"] = 0  # 0 and 0: "not set", a viewer scales to the data
    hdr.set_intent("none")
    if header is None:
        hdr.set_qform(like.affine, code=1)
        hdr.set_sform(like.affine, code=1)
    if description:
        hdr["descrip"] = description.encode("ascii", "replace")[:79]
    gz = suffix == ".nii.gz"

    def write(f: BinaryIO) -> None:
        f.write(gzip.compress(img.to_bytes(), compresslevel=6, mtime=0) if gz else img.to_bytes())
    return write


@dataclasses.dataclass(frozen=True)
class DisplayView:
    """How a picture shows a volume (:func:`to_display_orientation`).

    Attributes:
        reorient: spatial array in the file's axis order -> the picture's.
        voxel_index: a voxel index of the file -> its index in the reoriented array.
        zooms: voxel size along each axis of the reoriented array.
        layout: ``"ras"`` (axial, coronal, sagittal planes) or ``"array"`` (the array's axes).
        file_axes: for each axis of the reoriented array, the file's axis along it.
    """

    reorient: Callable[[np.ndarray], np.ndarray]
    voxel_index: Callable[[tuple[int, ...]], tuple[int, ...]]
    zooms: tuple[float, ...]
    layout: str
    file_axes: tuple[int, ...]


def to_display_orientation(volume: Volume) -> DisplayView:
    """How a picture shows ``volume`` (3 spatial axes).

    A NIfTI volume is turned to the closest RAS+ axis order (x to the right,
    y to the front, z up; flips and axis swaps only, no resampling), so that
    the planes are axial, coronal and sagittal: layout ``"ras"``. A ``.npy``
    volume stays as stored, planes along its array axes: ``"array"``.

    Example:
        >>> view = to_display_orientation(read_volume("/tmp/vol.npy"))
        >>> view.layout, view.voxel_index((1, 2, 3))
        ('array', (1, 2, 3))
    """
    if volume.header is None:
        return DisplayView(lambda a: a, lambda v: tuple(int(i) for i in v), tuple(volume.zooms), "array",
                           (0, 1, 2))
    import nibabel as nib

    ornt = nib.orientations.io_orientation(volume.affine)
    shape = volume.spatial_shape

    def reorient(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(nib.orientations.apply_orientation(a, ornt))

    def voxel_index(v) -> tuple[int, ...]:
        out = [0, 0, 0]
        for axis, (to, flip) in enumerate(ornt):
            out[int(to)] = int(v[axis]) if flip > 0 else shape[axis] - 1 - int(v[axis])
        return tuple(out)

    zooms, file_axes = [0.0, 0.0, 0.0], [0, 0, 0]
    for axis, (to, _) in enumerate(ornt):
        zooms[int(to)] = float(volume.zooms[axis])
        file_axes[int(to)] = axis
    return DisplayView(reorient, voxel_index, tuple(zooms), "ras", tuple(file_axes))
