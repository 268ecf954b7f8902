"""How the incremental graph runs a patched local op on its gathered window (a mixin of the
rewrite's emitter): with padding 0, since the gather supplies the borders; a transposed op's
result cropped to the box, a resampling op by its source taps (docs/design.md, "Geometry")."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import fx

from ..ops import gather_window
from .graph_fns import channels_last, crop_box, pointwise_conv, resample_window, sum_pool
from .patch_prop import PatchInfo

__all__ = ["WindowedOps", "transposed_padding"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def transposed_padding(full: int, crop: int, size: int, stride: int, dilation: int = 1) -> tuple[int, int, int]:
    """Padding and output padding that make a transposed conv return less than its whole
    (padding 0) result of ``full`` elements, still holding ``[crop, crop + size)``, and where
    the box then starts in what it returns.

    Padding ``p`` drops ``p`` elements from each end of the result and output padding
    ``q < max(stride, dilation)`` adds ``q`` at the far end, so the op returns
    ``full[p : full - p + q]``: the box stays inside while ``p <= min(crop, full + q -
    crop - size)``. Of those choices, one whose length is a multiple of the stride (the
    CPU's kernels run about twice as fast on it), then the shortest. Same values as the
    padding-0 result cropped: padding only leaves out work.

    Returns:
        ``(padding, output padding, crop within the returned result)``.

    Example:
        >>> transposed_padding(full=33, crop=1, size=30, stride=2)
        (1, 1, 0)
        >>> transposed_padding(full=9, crop=6, size=2, stride=2)
        (2, 1, 4)
    """
    best = None
    for q in range(max(stride, dilation)):
        p = min(crop, full + q - crop - size)
        if p < 0:
            continue
        length = full - 2 * p + q
        key = (length % stride != 0, length, q)
        if best is None or key < best[0]:
            best = (key, p, q)
    if best is None:  # the box is not inside the result: a caller's error
        raise ValueError(f"a box of {size} at {crop} is not inside a result of {full}")
    _, p, q = best
    return p, q, crop - p


class WindowedOps:
    """The emitter's windowed local ops. Uses the emitter's ``graph``, ``tables``, ``env``,
    ``backend``, ``_table`` (a per-position table) and ``_conv_params`` (conv weights)."""

    def _windowed_local(self, n: fx.Node, info: PatchInfo, window: fx.Node) -> fx.Node:
        """The local op on a gathered window: padding 0, the window supplies borders."""
        local = info.local
        nd = local.ndim
        g = self.graph
        zeros = (0,) * nd
        if local.op == "pad":
            return window  # the identity on the patch: the padded border never changes
        if local.op in ("conv", "conv_transpose"):
            if n.op == "call_module":
                weight, bias = self._conv_params(n)
            else:
                args = fx.map_arg(n.args, lambda m: self.env[m])
                kwargs = fx.map_arg(n.kwargs, lambda m: self.env[m])
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if local.op == "conv_transpose":  # the window's result holds the box at a static offset
                pad, out_pad, crop = self._transposed_padding(info)
                out = g.call_function(_CONV_T_FN[nd], (window, weight, bias, local.stride, pad, out_pad,
                                                      local.groups, local.dilation))
                return g.call_function(crop_box, (out, crop, info.box.sizes))
            if nd == 3 and all(k == 1 for k in local.kernel) and local.groups == 1:
                return g.call_function(pointwise_conv, (window, weight, bias, local.stride))
            return g.call_function(_CONV_FN[nd], (window, weight, bias, local.stride, zeros, local.dilation,
                                                  local.groups))
        if local.op == "shuffle":
            return g.call_function(crop_box, (g.call_function(F.pixel_shuffle, (window, local.stride[0])),
                                              info.crop, info.box.sizes))
        if local.op == "unshuffle":
            return g.call_function(F.pixel_unshuffle, (window, local.stride[0]))
        if local.op == "resample":
            return self._windowed_resample(info, window)
        out = self._windowed_pool(info, window)
        if nd == 3:
            # 3-D pools return contiguous maps on the CPU: back to channels-last once here,
            # or every later concat and 1x1x1 conv would convert again.
            out = g.call_method("contiguous", (out,), {"memory_format": torch.channels_last_3d})
        return out

    @staticmethod
    def _transposed_padding(info: PatchInfo) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Per axis, the padding and output padding with which a transposed conv on the window
        returns little more than the box (:func:`transposed_padding`), and the box's start in it."""
        local, axes = info.local, []
        for d, (length, k) in enumerate(zip(info.reads[0].window.sizes, local.kernel)):
            full = (length - 1) * local.stride[d] + (k - 1) * local.dilation[d] + 1
            axes.append(transposed_padding(full, info.crop[d], info.box.sizes[d], local.stride[d],
                                               local.dilation[d]))
        pad, out_pad, crop = zip(*axes)
        return pad, out_pad, crop

    def _windowed_resample(self, info: PatchInfo, window: fx.Node) -> fx.Node:
        """Resampling by per-axis source taps (geometry.AxisTaps): each position's box start and
        window start index the taps; nearest modes copy, the others weigh their taps."""
        g, k = self.graph, self._n_tables
        firsts, weights = [], []
        for axis, taps in enumerate(info.taps):
            self.tables.register_buffer(f"resample_first_{k}_{axis}", taps.first.clone())
            firsts.append(g.get_attr(f"krypton_tables.resample_first_{k}_{axis}"))
            if not taps.selects:
                self.tables.register_buffer(f"resample_weight_{k}_{axis}", taps.weight.clone())
            weights.append(None if taps.selects else g.get_attr(f"krypton_tables.resample_weight_{k}_{axis}"))
        table = self._table(torch.stack(list(info.box.starts) + list(info.reads[0].window.starts), 1))
        lerp = tuple(t.taps == 2 and bool(((t.weight.sum(1) - 1).abs() <= 1e-6).all()) for t in info.taps)
        return g.call_function(resample_window, (window, table, tuple(firsts), tuple(weights), info.box.sizes, lerp))

    def _windowed_pool(self, info: PatchInfo, window: fx.Node) -> fx.Node:
        local = info.local
        nd = local.ndim
        g = self.graph
        zeros = (0,) * nd
        if local.op == "max":
            return g.call_function(_MAX_POOL[nd], (window, local.kernel, local.stride, zeros,
                                                   local.dilation, False))
        inv = info.inv_divisor
        if isinstance(inv, float) and inv == 1.0 / math.prod(local.kernel):
            return g.call_function(_AVG_POOL[nd], (window, local.kernel, local.stride, zeros))
        total = g.call_function(sum_pool, (window, local.kernel, local.stride))
        if isinstance(inv, float):
            return g.call_function(operator.mul, (total, inv))
        # Border-dependent divisor: gather this position's window of the map.
        name = f"inv_divisor_{self._n_tables}"
        inv = inv.to(self.tables.color.dtype)
        self.tables.register_buffer(name, inv.contiguous(memory_format=channels_last(nd)))
        box = info.box
        table = self._table(torch.stack(list(box.starts) + [torch.zeros_like(s) for s in box.starts], 1))
        scale = g.call_function(gather_window, (g.get_attr(f"krypton_tables.{name}"), None, table,
                                                box.sizes), {"backend": self.backend})
        return g.call_function(operator.mul, (total, scale))
