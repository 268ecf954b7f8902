"""Hypothesis strategies shared by the tests.

Each section is self-contained: it imports what it needs and defines its own
helpers, so sections can be added or removed independently.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------
# Kernel cases: gather / projection / occlusion (tests/test_kernels.py)
# ---------------------------------------------------------------------------
# Small, odd, non-power-of-two shapes: the kernels run under TRITON_INTERPRET=1
# on the CPU, where every program costs milliseconds. Maps have ``axes`` spatial
# axes (1, 2 or 3; 2 unless asked). Windows are drawn so that they touch every
# border of the stored map; patch offsets so that patches lie fully inside,
# partly outside (clipped) or fully outside the window.
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as _F
from hypothesis import strategies as st
from torch import Tensor
from torch import nn as _nn

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# How a test tensor is laid out in memory; the kernels must read them all.
KERNEL_LAYOUTS = ("contiguous", "channels_last", "transposed", "strided")
# How an occlusion patch is weighted: plain colour, a profile per channel, one
# profile for all channels, a factor per position, or a profile and a factor.
OCCLUSION_FACTORS = ("none", "weight", "shared_weight", "scale", "weight_and_scale")


def _kernel_channels() -> st.SearchStrategy[int]:
    """One channel, a few (not a power of two), or many (crossing a 64-wide block)."""
    return st.one_of(st.just(1), st.integers(2, 7), st.integers(60, 70))


def _layout_tensor(shape: tuple[int, ...], dtype: torch.dtype, layout: str,
                   gen: torch.Generator) -> Tensor:
    """A ``(N, C, *S)`` tensor of random values with the given memory layout:
    ``contiguous``; ``channels_last`` (memory ``(N, *S, C)``); ``transposed``
    (the spatial axes in reverse order in memory, H and W swapped for images;
    for one axis, memory ``(C, N, L)``); ``strided`` (every other channel and
    every other element along the last axis: no unit stride at all)."""
    n, c, *spatial = shape
    axes = len(spatial)
    # Cast first: .to() of a non-dense view would return a contiguous copy.
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        return torch.randn(n, *spatial, c, generator=gen).to(dtype).movedim(-1, 1)
    if layout == "transposed":
        if axes == 1:
            return torch.randn(c, n, *spatial, generator=gen).to(dtype).transpose(0, 1)
        return torch.randn(n, c, *spatial[::-1], generator=gen).to(dtype).permute(
            0, 1, *range(axes + 1, 1, -1))
    wide = torch.randn(n, 2 * c, *spatial[:-1], 2 * spatial[-1], generator=gen).to(dtype)
    return wide[:, ::2, ..., ::2]


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
    """Arguments of ``gather_window_*`` (and, with ``color``, ``weight`` and ``scale``,
    ``occlude_window_*``)."""

    stored: Tensor                  # (1, C, *S)
    patch: Optional[Tensor]         # (B, C, *P) or None
    table: Tensor                   # int64 (B, 2N) [w_0..w_{N-1}, o_0..o_{N-1}]
    window: tuple[int, ...]         # N window sizes
    patch_size: tuple[int, ...]     # P, also when patch is None
    color: Tensor                   # (C,) colour for occlusion
    weight: Optional[Tensor] = None  # float32 (C, *P) or (1, *P) occlusion profile
    scale: Optional[Tensor] = None   # float32 (B,) occlusion factor per position

    def __repr__(self) -> str:  # tensors would flood the failure report
        return (f"GatherCase(stored={_describe(self.stored)}, patch={_describe(self.patch)}, "
                f"table={self.table.tolist()}, window={self.window}, "
                f"patch_size={self.patch_size}, color={self.color.tolist()}, "
                f"weight={_describe(self.weight)}, scale={_describe(self.scale)})")


@st.composite
def gather_cases(draw, max_batch: int = 4, max_size: int = 13, with_patch: Optional[bool] = None,
                 channels: Optional[st.SearchStrategy[int]] = None,
                 dtype: Optional[torch.dtype] = None,
                 stored_layout: Optional[str] = None, axes: int = 2,
                 factors: Optional[str] = None) -> GatherCase:
    """Random gather (or occlusion) problems on a small padded stored map with ``axes``
    spatial axes, each at most ``max_size`` long; ``dtype`` and ``stored_layout`` are
    drawn unless given (tests parametrize over them). ``factors`` (one of
    :data:`OCCLUSION_FACTORS`, or ``"any"`` to draw one) adds an occlusion weight
    and/or scale."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    c = draw(channels if channels is not None else _kernel_channels())
    size = [draw(st.integers(1, max_size)) for _ in range(axes)]
    batch = draw(st.integers(1, max_batch))
    windows = [_axis_window(draw, full) for full in size]
    window = tuple(w for w, _ in windows)
    patch_size = tuple(draw(st.integers(1, w + 2)) for w in window)
    rows = [[draw(start) for _, start in windows]
            + [draw(_patch_offset(p, w)) for p, w in zip(patch_size, window)]
            for _ in range(batch)]
    dtype = dtype if dtype is not None else draw(st.sampled_from(KERNEL_DTYPES))
    stored_layout = stored_layout or draw(st.sampled_from(KERNEL_LAYOUTS))
    stored = _layout_tensor((1, c, *size), dtype, stored_layout, gen)
    has_patch = draw(st.booleans()) if with_patch is None else with_patch
    patch = None
    if has_patch:
        # Sometimes another dtype: the launcher casts it to stored's.
        patch_dtype = draw(st.sampled_from((dtype, dtype, torch.float32)))
        patch = _layout_tensor((batch, c, *patch_size), patch_dtype,
                               draw(st.sampled_from(KERNEL_LAYOUTS)), gen)
    color = torch.randn(c, generator=gen)
    weight = scale = None
    if factors == "any":
        factors = draw(st.sampled_from(OCCLUSION_FACTORS))
    if factors in ("weight", "shared_weight", "weight_and_scale"):
        profiles = 1 if factors == "shared_weight" else c
        weight = _layout_tensor((1, profiles, *patch_size), torch.float32,
                                draw(st.sampled_from(KERNEL_LAYOUTS)), gen)[0]
    if factors in ("scale", "weight_and_scale"):
        scale = torch.randn(2 * batch, generator=gen)[::2]  # strided: any layout is read
    return GatherCase(stored, patch, torch.tensor(rows, dtype=torch.int64), window, patch_size,
                      color, weight, scale)


@dataclass(frozen=True)
class ProjectionCase:
    """Arguments of ``project_to_full_*``."""

    stored: Tensor   # (1, C, *S)
    patch: Tensor    # (B, C, *P)
    starts: Tensor   # int64 (B, N)

    def __repr__(self) -> str:
        return (f"ProjectionCase(stored={_describe(self.stored)}, patch={_describe(self.patch)}, "
                f"starts={self.starts.tolist()})")


@st.composite
def projection_cases(draw, max_batch: int = 4, max_size: int = 13,
                     dtype: Optional[torch.dtype] = None,
                     stored_layout: Optional[str] = None, axes: int = 2) -> ProjectionCase:
    """Random projections of maps with ``axes`` spatial axes; patches mostly inside the
    map (the rewrite's contract), sometimes clipped at a border (the torch reference
    drops those elements)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    c = draw(_kernel_channels())
    size = [draw(st.integers(1, max_size)) for _ in range(axes)]
    batch = draw(st.integers(1, max_batch))
    patch_size = [draw(st.integers(1, full)) for full in size]
    starts = [[draw(_patch_offset(p, full)) for p, full in zip(patch_size, size)]
              for _ in range(batch)]
    dtype = dtype if dtype is not None else draw(st.sampled_from(KERNEL_DTYPES))
    stored_layout = stored_layout or draw(st.sampled_from(KERNEL_LAYOUTS))
    stored = _layout_tensor((1, c, *size), dtype, stored_layout, gen)
    patch = _layout_tensor((batch, c, *patch_size), draw(st.sampled_from((dtype, torch.float32))),
                           draw(st.sampled_from(KERNEL_LAYOUTS)), gen)
    return ProjectionCase(stored, patch, torch.tensor(starts, dtype=torch.int64))


# ---------------------------------------------------------------------------
# Random small CNN DAGs (tests/test_properties.py)
# ---------------------------------------------------------------------------
# A network is a list of block specs, interpreted by RandomNet.forward with
# plain Python over the (static) spec, so it traces. Blocks cover every
# pitfall of docs/design.md: conv/pool with random kernel, stride, padding
# (incl. "same"), dilation, groups and ceil_mode; avg-pool divisor
# conventions; residual adds with strided downsampling; channel concats of
# branches with different receptive fields; point ops; then a global head.




@st.composite
def conv_spec(draw, channels: int, dims: int = 2):
    k = draw(st.integers(1, 5))
    kernel = (k,) * dims if draw(st.booleans()) else (k, *(draw(st.integers(1, 5)) for _ in range(dims - 1)))
    d = draw(st.integers(1, 2))
    s = draw(st.integers(1, 3))
    same = s == 1 and draw(st.booleans())
    pad = "same" if same else tuple(draw(st.integers(0, (kk - 1) // 2 + 1)) for kk in kernel)
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
    out = groups * draw(st.integers(1, 3))
    return {"op": "conv", "out": out, "kernel": kernel, "stride": s, "pad": pad, "dilation": d,
            "groups": groups, "bias": draw(st.booleans())}


@st.composite
def pool_spec(draw):
    k = draw(st.integers(2, 3))
    s = draw(st.integers(1, 3))
    p = draw(st.integers(0, k // 2))
    if draw(st.booleans()):
        return {"op": "max", "kernel": k, "stride": s, "pad": p, "dilation": draw(st.integers(1, 2)),
                "ceil": draw(st.booleans())}
    return {"op": "avg", "kernel": k, "stride": s, "pad": p, "ceil": draw(st.booleans()),
            "count_include_pad": draw(st.booleans())}


POINT_OPS = ("relu", "bn", "sigmoid", "affine", "channel_scale", "hardswish")

# In-place ops used as statements (the traced graph must be made functional):
# methods, inplace=True functions and an nn.ReLU(inplace=True) module.
INPLACE_OPS = ("relu_", "F.relu(inplace=True)", "mul_", "sigmoid_", "add_", "zero_", "ReLU(inplace=True)")


@st.composite
def inplace_spec(draw):
    """An in-place statement on the main path (later blocks read the mutated value), on a
    branch (a conv read it before the mutation, the merge after), or on a value nothing
    reads again."""
    return {"op": "inplace", "fn": draw(st.sampled_from(INPLACE_OPS)),
            "where": draw(st.sampled_from(["main", "branch", "unread"]))}


@st.composite
def block_spec(draw, channels: int, dims: int = 2):
    kinds = ["conv", "conv", "pool", "point", "residual", "concat", "inplace"]
    kind = draw(st.sampled_from(kinds + (["pad"] if dims != 2 else [])))
    if kind == "conv":
        return draw(conv_spec(channels, dims))
    if kind == "pad":  # constant padding, as a module or F.pad (MONAI's EfficientNet stem)
        return {"op": "pad", "before": tuple(draw(st.integers(0, 2)) for _ in range(dims)),
                "after": tuple(draw(st.integers(0, 2)) for _ in range(dims)),
                "value": draw(st.sampled_from([0.0, 0.5])), "module": draw(st.booleans())}
    if kind == "pool":
        return draw(pool_spec())
    if kind == "point":
        return {"op": "point", "fn": draw(st.sampled_from(POINT_OPS))}
    if kind == "inplace":
        return draw(inplace_spec())
    if kind == "residual":
        return {"op": "residual", "stride": draw(st.integers(1, 2)), "out": draw(st.integers(2, 5)),
                "kernel": draw(st.sampled_from([1, 3]))}
    return {"op": "concat", "out_a": draw(st.integers(1, 3)), "out_b": draw(st.integers(1, 3)),
            "kernel_b": draw(st.sampled_from([3, 5])), "pool_branch": draw(st.booleans())}


def _out_channels(spec, channels):
    op = spec["op"]
    if op in ("conv", "up"):
        return spec["out"]
    if op == "unet":
        return 2 * channels if spec["merge"] == "cat" else channels
    if op == "shuffle":
        return 4 * channels if spec["unshuffle"] else channels
    if op == "residual":
        return spec["out"]
    if op == "concat":
        return spec["out_a"] + spec["out_b"] + (channels if spec["pool_branch"] else 0)
    return channels


@st.composite
def random_cnns(draw, max_blocks: int = 5, dims: int = 2):
    """``(spec, in_channels)``: a random small CNN DAG with ``dims`` spatial axes."""
    in_ch = draw(st.sampled_from([1, 3]))
    blocks, ch = [], in_ch
    for _ in range(draw(st.integers(1, max_blocks))):
        spec = draw(block_spec(ch, dims))
        blocks.append(spec)
        ch = _out_channels(spec, ch)
    return blocks, in_ch


_CONV = {1: _nn.Conv1d, 2: _nn.Conv2d, 3: _nn.Conv3d}
_MAX = {1: _nn.MaxPool1d, 2: _nn.MaxPool2d, 3: _nn.MaxPool3d}
_AVG = {1: _nn.AvgPool1d, 2: _nn.AvgPool2d, 3: _nn.AvgPool3d}
_BN = {1: _nn.BatchNorm1d, 2: _nn.BatchNorm2d, 3: _nn.BatchNorm3d}
_CPAD = {1: _nn.ConstantPad1d, 2: _nn.ConstantPad2d, 3: _nn.ConstantPad3d}
_MAX_FN = {1: _F.max_pool1d, 2: _F.max_pool2d, 3: _F.max_pool3d}
_ADAPTIVE = {1: _F.adaptive_avg_pool1d, 2: _F.adaptive_avg_pool2d, 3: _F.adaptive_avg_pool3d}


class RandomNet(_nn.Module):
    """Interprets a spec from :func:`random_cnns`; ends with a global head."""

    def __init__(self, blocks, in_channels: int, classes: int = 5, dims: int = 2):
        super().__init__()
        self.blocks = blocks
        self.dims = dims
        self.layers = _nn.ModuleList()
        ch = in_channels
        for spec in blocks:
            self.layers.append(self._build(spec, ch, dims))
            ch = _out_channels(spec, ch)
        self.head = _nn.Linear(ch, classes)

    @staticmethod
    def _build(spec, ch, dims: int = 2):
        op = spec["op"]
        conv = _CONV[dims]
        if op == "conv":
            return conv(ch, spec["out"], spec["kernel"], spec["stride"], spec["pad"], spec["dilation"],
                        spec["groups"], spec["bias"])
        if op in ("up", "interp", "unet", "shuffle"):
            return _build_decoder(spec, ch, dims)
        if op == "max":
            return _MAX[dims](spec["kernel"], spec["stride"], spec["pad"], spec["dilation"],
                              ceil_mode=spec["ceil"])
        if op == "avg":
            return _AVG[dims](spec["kernel"], spec["stride"], spec["pad"], ceil_mode=spec["ceil"],
                              count_include_pad=spec["count_include_pad"])
        if op == "pad":
            pairs = [v for b, a in zip(reversed(spec["before"]), reversed(spec["after"])) for v in (b, a)]
            return _CPAD[dims](tuple(pairs), spec["value"]) if spec["module"] else _nn.Identity()
        if op == "point":
            fn = spec["fn"]
            if fn == "bn":
                bn = _BN[dims](ch)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                return bn
            if fn == "channel_scale":
                m = _nn.Module()
                m.scale = _nn.Parameter(torch.randn(1, ch, *(1,) * dims))
                return m
            return _nn.Identity()
        if op == "inplace":
            m = _nn.Module()
            m.conv = conv(ch, ch, 3, 1, 1)
            m.after = conv(ch, ch, 1)
            m.act = _nn.ReLU(inplace=True)
            return m
        if op == "residual":
            s, out, k = spec["stride"], spec["out"], spec["kernel"]
            m = _nn.Module()
            m.conv1 = conv(ch, out, k, s, k // 2)
            m.conv2 = conv(out, out, 3, 1, 1)
            m.down = conv(ch, out, 1, s) if (s != 1 or ch != out) else _nn.Identity()
            return m
        m = _nn.Module()
        m.a = conv(ch, spec["out_a"], 1)
        kb = spec["kernel_b"]
        m.b = conv(ch, spec["out_b"], kb, 1, kb // 2)
        return m

    def forward(self, x):
        for spec, layer in zip(self.blocks, self.layers):
            op = spec["op"]
            if op in ("conv", "max", "avg"):
                x = layer(x)
            elif op == "pad":
                pairs = [v for b, a in zip(reversed(spec["before"]), reversed(spec["after"])) for v in (b, a)]
                x = layer(x) if spec["module"] else _F.pad(x, pairs, value=spec["value"])
            elif op == "point":
                fn = spec["fn"]
                if fn == "relu":
                    x = _F.relu(x)
                elif fn == "bn":
                    x = layer(x)
                elif fn == "sigmoid":
                    x = torch.sigmoid(x)
                elif fn == "affine":
                    x = x * 0.5 + 1.0
                elif fn == "hardswish":
                    x = _F.hardswish(x)
                else:
                    x = x * layer.scale
            elif op in ("up", "interp", "unet", "shuffle"):
                x = _run_decoder(spec, layer, x, self.dims)
            elif op == "inplace":
                x = self._inplace(spec, layer, x)
            elif op == "residual":
                x = _F.relu(layer.conv2(_F.relu(layer.conv1(x))) + layer.down(x))
            else:
                parts = [layer.a(x), layer.b(x)]
                if spec["pool_branch"]:
                    parts.append(_MAX_FN[self.dims](x, 3, 1, 1))
                x = torch.cat(parts, 1)
        return self.head(torch.flatten(_ADAPTIVE[self.dims](x, 1), 1))

    @staticmethod
    def _inplace(spec, layer, x):
        where = spec["where"]
        if where == "main":
            target = x
        elif where == "branch":
            target = layer.conv(x)
            before = layer.after(target)  # reads the value before the mutation
        else:
            target = x * 2.0
        fn = spec["fn"]
        if fn == "relu_":
            target.relu_()
        elif fn == "F.relu(inplace=True)":
            _F.relu(target, inplace=True)
        elif fn == "mul_":
            target.mul_(1.5)
        elif fn == "sigmoid_":
            target.sigmoid_()
        elif fn == "add_":
            target.add_(0.25)
        elif fn == "zero_":
            target.zero_()
        else:
            layer.act(target)
        if where == "branch":
            return x + target + before  # reads the value after the mutation
        return x


# ---------------------------------------------------------------------------
# Random encoder-decoder DAGs (tests/test_decoder.py)
# ---------------------------------------------------------------------------
# Decoder blocks for RandomNet: transposed convs (module or F.conv_transposeNd, any
# stride, padding, output padding, dilation, groups), resampling of every mode (by
# integer or fractional scale, or to a size; nn.Upsample or F.interpolate), pixel
# (un)shuffle (2-D), and U-Net levels: a skip, a downsampling (pool or strided conv),
# a conv, an upsampling back to the skip's size (a transposed conv given
# output_size=skip.shape, or F.interpolate(size=skip.shape[2:])), then a concat or
# add with the skip. Sizes stay tiny: the nets end in the global head.

_CONV_T = {1: _nn.ConvTranspose1d, 2: _nn.ConvTranspose2d, 3: _nn.ConvTranspose3d}
_CONV_T_FN = {1: _F.conv_transpose1d, 2: _F.conv_transpose2d, 3: _F.conv_transpose3d}
_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _resample_modes(dims: int) -> list[str]:
    return ["nearest", "nearest-exact", _LINEAR_MODES[dims], "area"] + (["bicubic"] if dims == 2 else [])


@st.composite
def resample_spec(draw, dims: int = 2, to_skip: bool = False, room: float = 3.0):
    """How a map is resampled: mode, align_corners, and a scale factor (one for all axes or
    one per axis; integer or fractional, at most ``room``) or a size (or, ``to_skip``, the
    skip's size)."""
    mode = draw(st.sampled_from(_resample_modes(dims)))
    spec = {"mode": mode, "module": draw(st.booleans()) and not to_skip}
    if mode in _LINEAR_MODES.values() or mode == "bicubic":
        spec["align_corners"] = draw(st.booleans())
    if to_skip:
        return spec
    if draw(st.booleans()):
        scales = [f for f in (1.5, 2.0, 3.0, 0.5, 0.75) if f <= room]
        one = draw(st.booleans())
        spec["scale_factor"] = draw(st.sampled_from(scales)) if one else tuple(
            draw(st.sampled_from(scales)) for _ in range(dims))
        spec["recompute_scale_factor"] = draw(st.sampled_from([None, True]))
    else:
        spec["size"] = tuple(draw(st.integers(3, 24 if dims < 3 else 10)) for _ in range(dims))
    return spec


# How much decoder blocks may grow a map along each axis, in all (tests stay small).
GROWTH = {1: 8.0, 2: 4.0, 3: 2.0}


def _growth(spec) -> float:
    """The most a decoder block grows a map along an axis (a size counts as 2)."""
    op = spec["op"]
    if op == "up":
        return spec["stride"]
    if op == "interp":
        scale = spec.get("scale_factor", 2.0)
        return max(scale) if isinstance(scale, tuple) else scale
    return 2.0 if op == "shuffle" and not spec["unshuffle"] else 1.0


@st.composite
def decoder_block_spec(draw, channels: int, dims: int = 2, room: float = 3.0):
    """One decoder block (see the section's comment) that grows a map at most ``room`` times."""
    kinds = ["up", "interp", "unet", "unet"] + (["shuffle"] if dims == 2 and room >= 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "up":
        k, s, d = draw(st.integers(1, 4)), draw(st.integers(1, max(1, min(3, int(room))))), draw(st.integers(1, 2))
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0]))
        return {"op": "up", "out": groups * draw(st.integers(1, 3)), "kernel": k, "stride": s,
                "pad": draw(st.integers(0, d * (k - 1))), "output_padding": draw(st.integers(0, max(s, d) - 1)),
                "dilation": d, "groups": groups, "module": draw(st.booleans())}
    if kind == "interp":
        return {"op": "interp", **draw(resample_spec(dims, room=room))}
    if kind == "shuffle":
        return {"op": "shuffle", "unshuffle": draw(st.booleans())}
    down = draw(st.sampled_from(["max", "avg", "conv"]))
    up = draw(st.sampled_from(["transpose", "interp"]))
    # a transposed conv back to the skip's size needs an output padding below its stride:
    # after a floor-halving pool, kernel 2 (pad 0) or 4 (pad 1); after a ceil-halving conv, 3 (pad 1)
    kernel = draw(st.sampled_from([2, 4])) if down != "conv" else 3
    return {"op": "unet", "down": down, "up": up, "kernel": kernel, "mid": draw(st.integers(1, 4)),
            "merge": draw(st.sampled_from(["cat", "add"])), "resample": draw(resample_spec(dims, to_skip=True))}


@st.composite
def random_encoder_decoders(draw, max_blocks: int = 3, dims: int = 2):
    """``(spec, in_channels)``: encoder blocks (as :func:`random_cnns`) and at least one
    decoder block, in a random order."""
    in_ch = draw(st.sampled_from([1, 3]))
    blocks, ch, room = [], in_ch, GROWTH[dims]
    decoders = draw(st.integers(1, max_blocks))
    for i in range(draw(st.integers(decoders, max_blocks + 1))):
        decoder = i < decoders
        spec = draw(decoder_block_spec(ch, dims, room) if decoder else block_spec(ch, dims))
        room /= _growth(spec) if decoder else 1.0
        blocks.append(spec)
        ch = _out_channels(spec, ch)
    order = draw(st.permutations(range(len(blocks))))
    blocks = [blocks[i] for i in order]
    ch, fixed = in_ch, []  # channels and groups again, in the drawn order
    for spec in blocks:
        if spec["op"] in ("up", "conv") and ch % spec["groups"]:
            spec = {**spec, "groups": 1}
        fixed.append(spec)
        ch = _out_channels(spec, ch)
    return fixed, in_ch


def _resample_kwargs(spec) -> dict:
    keys = ("mode", "align_corners", "scale_factor", "recompute_scale_factor", "size")
    return {k: spec[k] for k in keys if k in spec}


def _build_decoder(spec, ch, dims):
    op = spec["op"]
    if op == "up":
        m = _CONV_T[dims](ch, spec["out"], spec["kernel"], spec["stride"], spec["pad"], spec["output_padding"],
                          spec["groups"], True, spec["dilation"])
        return m
    if op == "interp":
        return _nn.Upsample(**_resample_kwargs(spec)) if spec["module"] else _nn.Identity()
    if op == "shuffle":
        m = _nn.Module()
        m.expand = _CONV[dims](ch, 4 * ch, 1)
        m.shuffle = _nn.PixelShuffle(2)
        m.unshuffle = _nn.PixelUnshuffle(2)
        return m
    m, mid = _nn.Module(), spec["mid"]
    m.down = _CONV[dims](ch, mid, 3, 2, 1) if spec["down"] == "conv" else (
        (_MAX if spec["down"] == "max" else _AVG)[dims](2, 2))
    m.conv = _CONV[dims](mid if spec["down"] == "conv" else ch, mid, 3, 1, 1)
    k = spec["kernel"]
    m.up = _CONV_T[dims](mid, ch, k, 2, (k - 1) // 2 if k != 2 else 0) if spec["up"] == "transpose" else (
        _CONV[dims](mid, ch, 1))
    return m


def _run_decoder(spec, layer, x, dims):
    op = spec["op"]
    if op == "up":
        if spec["module"]:
            return layer(x)
        return _CONV_T_FN[dims](x, layer.weight, layer.bias, spec["stride"], spec["pad"],
                                       spec["output_padding"], spec["groups"], spec["dilation"])
    if op == "interp":
        return layer(x) if spec["module"] else _F.interpolate(x, **_resample_kwargs(spec))
    if op == "shuffle":
        y = layer.shuffle(_F.relu(layer.expand(x)))
        return layer.unshuffle(y) if spec["unshuffle"] else y
    skip = x
    y = _F.relu(layer.conv(layer.down(x)))
    if spec["up"] == "transpose":
        y = layer.up(y, output_size=skip.shape)
    else:
        y = layer.up(_F.interpolate(y, size=skip.shape[2:], **_resample_kwargs(spec["resample"])))
    return torch.cat([y, skip], 1) if spec["merge"] == "cat" else y + skip


# One fixed DAG with every kind of node: a padded conv, a ceil-mode strided max
# pool, a residual add across a stride, a concat with a pooling branch, an
# average pool without padded counts. Tests that need one small model that
# exercises everything (the Triton backend, the GPU path) use it.
DAG_BLOCKS = [
    {"op": "conv", "out": 4, "kernel": (3, 3), "stride": 1, "pad": (1, 1), "dilation": 1,
     "groups": 1, "bias": True},
    {"op": "max", "kernel": 3, "stride": 2, "pad": 1, "dilation": 1, "ceil": True},
    {"op": "residual", "stride": 2, "out": 5, "kernel": 3},
    {"op": "concat", "out_a": 2, "out_b": 3, "kernel_b": 5, "pool_branch": True},
    {"op": "avg", "kernel": 3, "stride": 1, "pad": 1, "ceil": False, "count_include_pad": False},
]


def dag_model(seed: int = 0) -> RandomNet:
    """:data:`DAG_BLOCKS` on 3-channel images, seeded, in eval mode."""
    torch.manual_seed(seed)
    return RandomNet(DAG_BLOCKS, 3).eval()


@st.composite
def occlusion_settings(draw, channels: int, dims: int = 2):
    """Image size, patch, stride and colour for a small occlusion experiment (``dims`` spatial
    axes: volumes are kept small, signals long)."""
    low, high = {1: (16, 60), 2: (12, 28), 3: (8, 14)}[dims]
    size = tuple(draw(st.integers(low, high)) for _ in range(dims))
    patch = tuple(draw(st.integers(1, min(n, 9 if dims < 3 else 5))) for n in size)
    stride = tuple(draw(st.integers(2, 7 if dims < 3 else 4)) for _ in range(dims))
    if draw(st.booleans()):
        color = draw(st.floats(-2, 2, allow_nan=False))
    else:
        color = [draw(st.floats(-2, 2, allow_nan=False)) for _ in range(channels)]
    return size, patch, stride, color


def assert_random_dag_exact(blocks, in_ch: int, data, seed: int, dims: int = 2) -> None:
    """Compile :class:`RandomNet` ``blocks`` and check its map equals naive occlusion
    (occlusion settings drawn from ``data``); rejects nets whose maps shrink to nothing."""
    from hypothesis import assume

    import krypton_fx

    size, patch, stride, color = data.draw(occlusion_settings(in_ch, dims))
    torch.manual_seed(seed)
    model = RandomNet(blocks, in_ch, dims=dims).eval()
    image = torch.randn(in_ch, *size)
    try:
        model(image[None].clone())  # a clone: an in-place first block must not edit the image
    except RuntimeError:
        assume(False)  # the drawn layers shrink the map below one element
    ex = krypton_fx.compile(model, patch=patch, stride=stride, color=color, image_size=size,
                            channels=in_ch, output="logit")
    got = ex(image)
    want = krypton_fx.naive_occlusion(model, image, patch=patch, stride=stride, color=color,
                                      output="logit", spatial_dims=dims)
    assert got.label == want.label
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# Feature masks for Captum's FeatureAblation (tests/test_captum_ablation.py)
# ---------------------------------------------------------------------------
# A small (N, C, H, W) input and a mask that broadcasts to it in every way Captum
# takes: shared or per example, per channel or not, constant along a spatial axis,
# with fewer dimensions than the input; ids arbitrary integers (negative, gaps),
# so segments come in several pieces; baselines of every form.


@dataclass(frozen=True)
class AblationCase:
    shape: tuple[int, ...]         # the input's (N, C, H, W)
    mask: Tensor                   # int64 ids, broadcastable to shape, maybe fewer dims
    baseline: object               # a float or a tensor broadcastable to shape
    target: object                 # an int or one class per example (list)
    ppe: int                       # perturbations_per_eval
    seed: int                      # for the input and the forward's weights


@st.composite
def ablation_cases(draw, classes: int = 3) -> AblationCase:
    n, c, h, w = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
                  draw(st.integers(1, 4)))
    mask_shape = [draw(st.sampled_from([1, size])) for size in (n, c, h, w)]
    drop = draw(st.integers(0, 2)) if mask_shape[:2] == [1, 1] else 0  # fewer dims: leading ones only
    mask_shape = mask_shape[drop:]
    ids = draw(st.lists(st.integers(-3, 9), min_size=1, max_size=5, unique=True))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor(ids)[torch.randint(len(ids), mask_shape, generator=gen)]
    kind = draw(st.sampled_from(["scalar", "per-channel", "image", "per-example"]))
    baseline = {"scalar": draw(st.floats(-2, 2, allow_nan=False)),
                "per-channel": torch.randn(c, 1, 1, generator=gen),
                "image": torch.randn(1, c, h, w, generator=gen),
                "per-example": torch.randn(n, c, h, w, generator=gen)}[kind]
    target = (draw(st.integers(-classes, classes - 1)) if draw(st.booleans())
              else [draw(st.integers(0, classes - 1)) for _ in range(n)])
    return AblationCase((n, c, h, w), mask, baseline, target, draw(st.integers(1, 4)), seed)


# ---------------------------------------------------------------------------
# Monotone nets and planted drops: the peak rule's guarantee (tests/test_approx_peak.py)
# ---------------------------------------------------------------------------
# A RandomNet whose every weight is non-negative and whose point ops are
# non-decreasing computes logits that are non-decreasing in every input element.
# On a non-negative image occluded with colour 0, a larger occluder then lowers
# every logit at least as much as one it contains: the assumption under which
# drill-down's covering stage one cannot miss the peak holds exactly.


def monotone_net(blocks, in_channels: int, dims: int = 2, seed: int = 0) -> RandomNet:
    """:class:`RandomNet` of ``blocks`` with non-negative weights and non-decreasing point ops
    (hardswish, which dips below zero, becomes relu), in eval mode."""
    blocks = [dict(b, fn="relu") if b["op"] == "point" and b["fn"] == "hardswish" else b for b in blocks]
    torch.manual_seed(seed)
    net = RandomNet(blocks, in_channels, dims=dims).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.endswith("bias"):
                p.abs_()
    return net


@st.composite
def planted_drops(draw, dims: int = 2):
    """``(size, patch, stride, step, corner, side)``: an occlusion grid of at least 3 cells per
    axis, a stage-one step of 2-4 cells, and a bright cube of ``side`` (at most the patch) at
    ``corner``: a drop narrower than the stage-one stride."""
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    patch = tuple(draw(st.integers(max(2, s), 6)) for s in stride)
    size = tuple(draw(st.integers(p + 2 * s, min(p + 2 * s + 12, 28 if dims < 3 else 14)))
                 for p, s in zip(patch, stride))
    step = draw(st.integers(2, 4))
    side = tuple(draw(st.integers(1, p)) for p in patch)
    corner = tuple(draw(st.integers(0, n - w)) for n, w in zip(size, side))
    return size, patch, stride, step, corner, side


def planted_image(channels: int, size, corner, side, seed: int = 0) -> Tensor:
    """A dim random image in ``[0, 0.1)`` with a bright (1.0) box of ``side`` at ``corner``."""
    gen = torch.Generator().manual_seed(seed)
    image = 0.1 * torch.rand(channels, *size, generator=gen)
    image[(slice(None), *(slice(c, c + w) for c, w in zip(corner, side)))] = 1.0
    return image


# ---------------------------------------------------------------------------
# Segmentation targets: random encoder-decoder nets with a dense output
# (tests/test_segmentation.py)
# ---------------------------------------------------------------------------
# U-Net-shaped nets of 1-2 levels: a stem conv, per level a skip, a downsampling
# (max or avg pool, or a strided conv), a conv; back up by a transposed conv or an
# interpolation of any mode (by scale 2, or to the skip's size), a concat or add
# with the skip, a conv; a 1x1 head to the classes: no global op, so that the
# output is a map the target reduces. Sizes are multiples of 2**levels unless every
# upsampling goes to the skip's size (odd sizes then). With random occlusion
# settings, output, reduce and mask.

_SEG_CONV = {2: _nn.Conv2d, 3: _nn.Conv3d}
_SEG_CONV_T = {2: _nn.ConvTranspose2d, 3: _nn.ConvTranspose3d}
_SEG_POOL = {("max", 2): _nn.MaxPool2d, ("max", 3): _nn.MaxPool3d, ("avg", 2): _nn.AvgPool2d,
             ("avg", 3): _nn.AvgPool3d}
SEG_UPSAMPLINGS = ("transpose", "nearest", "nearest-exact", "linear", "linear-corners", "size-nearest",
                   "size-linear")


@dataclass(frozen=True)
class SegCase:
    levels: tuple  # per level (down, up, merge): down in max/avg/conv, up in SEG_UPSAMPLINGS, merge cat/add
    dims: int
    in_channels: int
    classes: int
    size: tuple
    patch: tuple
    stride: tuple
    color: tuple
    category: int
    output: str
    reduce: str
    mask: str  # "given" or "predicted"
    seed: int


@st.composite
def seg_encoder_decoders(draw):
    dims = draw(st.sampled_from([2, 2, 3]))
    levels = tuple((draw(st.sampled_from(["max", "avg", "conv"])), draw(st.sampled_from(SEG_UPSAMPLINGS)),
                    draw(st.sampled_from(["cat", "add"]))) for _ in range(draw(st.integers(1, 2))))
    odd = all(up.startswith("size") for _, up, _ in levels)
    unit = 2 ** len(levels)
    top = 16 if dims == 2 else 8
    size = tuple(draw(st.integers(3, top)) if odd else unit * draw(st.integers(max(1, 3 // unit + 1), top // unit))
                 for _ in range(dims))
    patch = tuple(draw(st.integers(1, max(1, n // 2))) for n in size)
    stride = tuple(draw(st.integers(max(1, p // 2), max(1, p))) for p in patch)
    output = draw(st.sampled_from(["prob", "sigmoid", "logit"]))
    classes = draw(st.integers(1, 2)) if output == "sigmoid" else draw(st.integers(2, 3))
    in_channels = draw(st.sampled_from([1, 2]))
    color = tuple(draw(st.floats(-1, 1, width=32)) for _ in range(draw(st.sampled_from([1, in_channels]))))
    return SegCase(levels, dims, in_channels, classes, size, patch, stride, color, draw(st.integers(0, classes - 1)),
                   output, draw(st.sampled_from(["mean", "sum"])), draw(st.sampled_from(["given", "predicted"])),
                   draw(st.integers(0, 2 ** 16)))


class SegNet(_nn.Module):
    """The net of a :class:`SegCase` (see the section's comment)."""

    WIDTH = 3

    def __init__(self, case: SegCase):
        super().__init__()
        d, w = case.dims, self.WIDTH
        self.case = case
        self.stem = _SEG_CONV[d](case.in_channels, w, 3, padding=1)
        self.down = _nn.ModuleList(_SEG_CONV[d](w, w, 3, 2, 1) if down == "conv" else _SEG_POOL[(down, d)](2)
                                   for down, _, _ in case.levels)
        self.inner = _nn.ModuleList(_SEG_CONV[d](w, w, 3, padding=1) for _ in case.levels)
        self.up = _nn.ModuleList(_SEG_CONV_T[d](w, w, 2, 2) if up == "transpose" else _nn.Identity()
                                 for _, up, _ in case.levels)
        self.fuse = _nn.ModuleList(_SEG_CONV[d](2 * w if merge == "cat" else w, w, 3, padding=1)
                                   for _, _, merge in case.levels)
        self.head = _SEG_CONV[d](w, case.classes, 1)

    def _level(self, i: int, x: Tensor) -> Tensor:
        down, up, merge = self.case.levels[i]
        skip = x
        x = _F.relu(self.inner[i](self.down[i](x)))
        if i + 1 < len(self.case.levels):
            x = self._level(i + 1, x)
        linear = "trilinear" if self.case.dims == 3 else "bilinear"
        if up == "transpose":
            x = self.up[i](x)
        elif up.startswith("size"):
            mode = "nearest" if up == "size-nearest" else linear
            x = _F.interpolate(x, size=skip.shape[2:], mode=mode, **({} if mode == "nearest" else
                                                                    {"align_corners": False}))
        else:
            mode = linear if up.startswith("linear") else up
            kw = {"align_corners": up == "linear-corners"} if mode == linear else {}
            x = _F.interpolate(x, scale_factor=2, mode=mode, **kw)
        x = torch.cat([skip, x], 1) if merge == "cat" else skip + x
        return _F.relu(self.fuse[i](x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self._level(0, _F.relu(self.stem(x))))


def seg_model(case: SegCase) -> SegNet:
    """The case's net, seeded, in eval mode; the category's head bias raised so that a
    predicted mask is rarely empty."""
    torch.manual_seed(case.seed)
    model = SegNet(case).eval()
    with torch.no_grad():
        model.head.bias[case.category] += 1.0
    return model


def randomize_batchnorm(model: _nn.Module, seed: int = 0, affine: bool = False) -> _nn.Module:
    """``model`` in eval mode with non-trivial running statistics (and with ``affine`` weights
    and biases), so that a batch norm is not the identity and differs from train mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if affine and m.weight is not None:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()
