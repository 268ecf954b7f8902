"""The source taps of a resampling op (``F.interpolate``, ``nn.Upsample``), per axis, taken
from the op itself.

PyTorch's interpolation kernels compute their source indices in float32 (and
nearest picks ``floor(o * float(1 / scale))``, which is not always ``o // scale``),
so any formula written here would disagree with them somewhere. Instead the op
runs once per axis on a one-hot basis along that axis: its output is the
axis's resampling matrix (``(O, I)``: output ``o`` is ``matrix[o] @ x``), with
the kernel's own indices and weights, on the device and in the dtype it will run
on. Every mode is separable (nearest, nearest-exact, linear, bilinear, bicubic,
trilinear, area, antialiased or not), so an N-D op is the product of its axes'
matrices (docs/design.md, "Geometry").
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .geometry import AxisTaps
from .registry import LocalOp

__all__ = ["resample_taps"]


def _axis_matrix(local: LocalOp, axis: int, in_full: tuple[int, ...], out_full: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The op's ``(O, I)`` matrix along ``axis``: input ``j`` of the batch is the one-hot
    ``e_j`` along ``axis``; the other axes are as short as the op allows and read at 0."""
    args = local.resample
    n, size = len(in_full), in_full[axis]
    if args.scale_factor is None:  # from the output size: each axis on its own
        shape = tuple(size if a == axis else 1 for a in range(n))
        kwargs = dict(size=tuple(out_full[a] if a == axis else 1 for a in range(n)))
    else:  # the kernel gets the scales: keep them, other axes just long enough for one output
        shape = tuple(size if a == axis else max(1, math.ceil(1 / s)) for a, s in enumerate(args.scale_factor))
        kwargs = dict(scale_factor=args.scale_factor, recompute_scale_factor=False)
    eye = torch.eye(size, dtype=dtype, device=device)
    basis = eye.view(size, 1, *(size if a == axis else 1 for a in range(n))).expand(size, 1, *shape)
    out = F.interpolate(basis.contiguous(), mode=args.mode, align_corners=args.align_corners,
                        antialias=args.antialias, **kwargs)
    if out.shape[2 + axis] != out_full[axis]:
        raise ValueError(f"resampling axis {axis} on its own gives {out.shape[2 + axis]} outputs, "
                         f"not {out_full[axis]}")
    out = out[(slice(None), 0, *(slice(None) if a == axis else 0 for a in range(n)))]  # (I, O)
    return out.t()


def resample_taps(local: LocalOp, in_full: tuple[int, ...], out_full: tuple[int, ...],
                  dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None
                  ) -> tuple[AxisTaps, ...]:
    """Per-axis taps of a resampling op (``local.op == "resample"``) from ``in_full`` to
    ``out_full``; raises ValueError where the op is not a monotone separable resampling.

    Example:
        >>> from krypton_fx.registry import LocalOp, Resample
        >>> op = LocalOp("resample", (1,), (1,), (0,), resample=Resample("linear", False, (2.0,)))
        >>> taps, = resample_taps(op, (3,), (6,))
        >>> taps.first.tolist(), taps.weight[:3].tolist()
        ([0, 0, 0, 1, 1, 2], [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75]])
    """
    with torch.no_grad():
        return tuple(AxisTaps.from_matrix(_axis_matrix(local, a, in_full, out_full, dtype, device).float())
                     for a in range(len(in_full)))
