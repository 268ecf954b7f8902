"""Hypothesis strategies shared by the tests.

Each section is self-contained: it imports what it needs and defines its own
helpers, so sections can be added or removed independently.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------
# Kernel cases: gather / projection / occlusion (tests/test_kernels.py)
# ---------------------------------------------------------------------------
# Small, odd, non-power-of-two shapes: the kernels run under TRITON_INTERPRET=1
# on the CPU, where every program costs milliseconds. Windows are drawn so that
# they touch every border of the stored map; patch offsets so that patches lie
# fully inside, partly outside (clipped) or fully outside the window.

from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# How a test tensor is laid out in memory; the kernels must read them all.
KERNEL_LAYOUTS = ("contiguous", "channels_last", "transposed", "strided")


def _kernel_channels() -> st.SearchStrategy[int]:
    """One channel, a few (not a power of two), or many (crossing a 64-wide block)."""
    return st.one_of(st.just(1), st.integers(2, 7), st.integers(60, 70))


def _layout_tensor(shape: tuple[int, ...], dtype: torch.dtype, layout: str,
                   gen: torch.Generator) -> Tensor:
    """A ``(N, C, H, W)`` tensor of random values with the given memory layout."""
    n, c, h, w = shape
    # Cast first: .to() of a non-dense view would return a contiguous copy.
    if layout == "contiguous":
        return torch.randn(n, c, h, w, generator=gen).to(dtype)
    if layout == "channels_last":
        return torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(
            memory_format=torch.channels_last)
    if layout == "transposed":  # H and W swapped in memory
        return torch.randn(n, c, w, h, generator=gen).to(dtype).transpose(2, 3)
    # Every other channel and every other element along W: no unit stride at all.
    return torch.randn(n, 2 * c, h, 2 * w, generator=gen).to(dtype)[:, ::2, :, ::2]


def _describe(tensor: Optional[Tensor]) -> str:
    """Shape, strides and dtype: what a failing kernel case needs, without the values."""
    if tensor is None:
        return "None"
    return f"{tuple(tensor.shape)}/strides {tensor.stride()}/{str(tensor.dtype)[6:]}"


def _axis_window(draw, full: int) -> tuple[int, st.SearchStrategy[int]]:
    """A window size along one axis of a ``full``-long map, and a strategy for its start
    biased to both borders."""
    size = draw(st.integers(1, full))
    last = full - size
    return size, st.one_of(st.just(0), st.just(last), st.integers(0, last))


def _patch_offset(size: int, window: int) -> st.SearchStrategy[int]:
    """Patch start relative to a ``window``-long window: inside, clipped at either end,
    or fully outside."""
    inside = st.integers(0, max(0, window - size))
    return st.one_of(inside, st.integers(-size - 1, window + 1))


@dataclass(frozen=True)
class GatherCase:
    """Arguments of ``gather_window_*`` (and, with ``color``, ``occlude_window_*``)."""

    stored: Tensor              # (1, C, Hs, Ws)
    patch: Optional[Tensor]     # (B, C, h, w) or None
    table: Tensor               # int64 (B, 4) [win_y, win_x, off_y, off_x]
    window: tuple[int, int]     # (R, Rw)
    patch_hw: tuple[int, int]   # (h, w), also when patch is None
    color: Tensor               # (C,) colour for occlusion

    def __repr__(self) -> str:  # tensors would flood the failure report
        return (f"GatherCase(stored={_describe(self.stored)}, patch={_describe(self.patch)}, "
                f"table={self.table.tolist()}, window={self.window}, patch_hw={self.patch_hw}, "
                f"color={self.color.tolist()})")


@st.composite
def gather_cases(draw, max_batch: int = 4, max_size: int = 13, with_patch: Optional[bool] = None,
                 channels: Optional[st.SearchStrategy[int]] = None,
                 dtype: Optional[torch.dtype] = None,
                 stored_layout: Optional[str] = None) -> GatherCase:
    """Random gather (or occlusion) problems on a small padded stored map; ``dtype`` and
    ``stored_layout`` are drawn unless given (tests parametrize over them)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    c = draw(channels if channels is not None else _kernel_channels())
    hs, ws = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    batch = draw(st.integers(1, max_batch))
    (r, y_start), (rw, x_start) = _axis_window(draw, hs), _axis_window(draw, ws)
    h, w = draw(st.integers(1, r + 2)), draw(st.integers(1, rw + 2))
    rows = [[draw(y_start), draw(x_start), draw(_patch_offset(h, r)), draw(_patch_offset(w, rw))]
            for _ in range(batch)]
    dtype = dtype if dtype is not None else draw(st.sampled_from(KERNEL_DTYPES))
    stored_layout = stored_layout or draw(st.sampled_from(KERNEL_LAYOUTS))
    stored = _layout_tensor((1, c, hs, ws), dtype, stored_layout, gen)
    has_patch = draw(st.booleans()) if with_patch is None else with_patch
    patch = None
    if has_patch:
        # Sometimes another dtype: the launcher casts it to stored's.
        patch_dtype = draw(st.sampled_from((dtype, dtype, torch.float32)))
        patch = _layout_tensor((batch, c, h, w), patch_dtype,
                               draw(st.sampled_from(KERNEL_LAYOUTS)), gen)
    color = torch.randn(c, generator=gen)
    return GatherCase(stored, patch, torch.tensor(rows, dtype=torch.int64), (r, rw), (h, w),
                      color)


@dataclass(frozen=True)
class ProjectionCase:
    """Arguments of ``project_to_full_*``."""

    stored: Tensor   # (1, C, H, W)
    patch: Tensor    # (B, C, h, w)
    starts: Tensor   # int64 (B, 2) [y, x]

    def __repr__(self) -> str:
        return (f"ProjectionCase(stored={_describe(self.stored)}, patch={_describe(self.patch)}, "
                f"starts={self.starts.tolist()})")


@st.composite
def projection_cases(draw, max_batch: int = 4, max_size: int = 13,
                     dtype: Optional[torch.dtype] = None,
                     stored_layout: Optional[str] = None) -> ProjectionCase:
    """Random projections; patches mostly inside the map (the rewrite's contract),
    sometimes clipped at a border (the torch reference drops those elements)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    c = draw(_kernel_channels())
    hf, wf = draw(st.integers(1, max_size)), draw(st.integers(1, max_size))
    batch = draw(st.integers(1, max_batch))
    h, w = draw(st.integers(1, hf)), draw(st.integers(1, wf))
    starts = [[draw(_patch_offset(h, hf)), draw(_patch_offset(w, wf))] for _ in range(batch)]
    dtype = dtype if dtype is not None else draw(st.sampled_from(KERNEL_DTYPES))
    stored_layout = stored_layout or draw(st.sampled_from(KERNEL_LAYOUTS))
    stored = _layout_tensor((1, c, hf, wf), dtype, stored_layout, gen)
    patch = _layout_tensor((batch, c, h, w), draw(st.sampled_from((dtype, torch.float32))),
                           draw(st.sampled_from(KERNEL_LAYOUTS)), gen)
    return ProjectionCase(stored, patch, torch.tensor(starts, dtype=torch.int64))
