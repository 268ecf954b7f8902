"""The op registry: which of the five kinds (docs/design.md) each graph node is.

The table is data: module types, functions and method names map to a
:class:`Rule`. Passes ask :func:`lookup` and never ``isinstance``-chain over
ops themselves. A node the registry does not know is ``GLOBAL``: slower, never
wrong.

Local rules carry an ``extract`` function that reads the op's window
parameters (kernel, stride, padding, dilation, ...) from the module or the
call's arguments; :class:`LocalOp` describes how the incremental graph runs
the op on a gathered window (always with zero padding: the gather supplies
the border values).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["Kind", "Rule", "LocalOp", "Resample", "lookup", "register_module", "register_function",
           "register_method"]


class Kind(enum.Enum):
    """The five kinds of docs/design.md."""

    SOURCE = "source"      # the image placeholder
    POINT = "point"        # elementwise in space; one or more inputs (merges are decided by PatchProp)
    LOCAL = "local"        # sliding window: conv / pool
    MERGE = "merge"        # elementwise over several feature maps (add, cat on channels)
    GLOBAL = "global"      # anything else


@dataclasses.dataclass(frozen=True)
class Resample:
    """``F.interpolate``'s arguments, as its kernel sees them.

    Attributes:
        mode: ``"nearest"``, ``"nearest-exact"``, ``"linear"``, ``"bilinear"``,
            ``"bicubic"``, ``"trilinear"`` or ``"area"``.
        align_corners: as given (None for the modes that take none).
        scale_factor: one per spatial axis where the kernel is given the scale
            (``scale_factor=`` without ``recompute_scale_factor``); None where it
            works from the output size alone.
        antialias: ``antialias=``.
    """

    mode: str
    align_corners: Optional[bool]
    scale_factor: Optional[tuple[float, ...]]
    antialias: bool = False


# Ops that scatter each input over a window of outputs (docs/design.md, "Geometry").
TRANSPOSED_OPS = ("conv_transpose", "shuffle")


@dataclasses.dataclass(frozen=True)
class LocalOp:
    """Window parameters of a local op, one entry per spatial axis (1, 2 or 3).

    Attributes:
        op: ``"conv"``, ``"max"``, ``"avg"``, ``"pad"`` (constant padding:
            the identity on a window, shifted by the padding before it),
            ``"unshuffle"`` (pixel unshuffle: a window op of kernel = stride = r),
            the transposed ops ``"conv_transpose"`` and ``"shuffle"`` (pixel
            shuffle: kernel = stride = r), or ``"resample"`` (``F.interpolate``;
            its windows come from ``resample``).
        kernel: kernel size per axis, before dilation.
        stride: stride per axis.
        pad: padding before the first element, per axis.
        dilation: dilation per axis.
        fill: value of out-of-image elements (0 for conv and avg, -inf for max).
        groups: conv groups (1 for pools).
        count_include_pad: avg-pool divisor convention.
        divisor_override: avg-pool divisor override.
        ceil_mode: pooling output-size convention.
        full_pad: the op's own padding argument, to build the divisor map.
        resample: ``F.interpolate``'s arguments (``op == "resample"``).
    """

    op: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    dilation: tuple[int, ...] = ()
    fill: float = 0.0
    groups: int = 1
    count_include_pad: bool = True
    divisor_override: Optional[int] = None
    ceil_mode: bool = False
    full_pad: tuple[int, ...] = ()
    resample: Optional[Resample] = None

    def __post_init__(self):
        n = len(self.kernel)
        if not self.dilation:
            object.__setattr__(self, "dilation", (1,) * n)
        if not self.full_pad:
            object.__setattr__(self, "full_pad", tuple(self.pad))

    @property
    def ndim(self) -> int:
        """Spatial axes."""
        return len(self.kernel)

    @property
    def effective_kernel(self) -> tuple[int, ...]:
        """Dilated extent ``d * (K - 1) + 1`` per axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))


@dataclasses.dataclass(frozen=True)
class Rule:
    """How PatchProp treats one op.

    Attributes:
        kind: POINT, LOCAL, MERGE or GLOBAL. POINT ops with several spatial
            inputs become merges.
        extract: for LOCAL, ``(module, args, kwargs) -> LocalOp | None``; None
            means "not supported in this configuration: treat as global".
        check: for POINT, ``(module, args, kwargs) -> bool``; False makes the
            node global (e.g. ``torch.cat`` on a dimension other than channels).
    """

    kind: Kind
    extract: Optional[Callable[..., Optional[LocalOp]]] = None
    check: Optional[Callable[..., bool]] = None


def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    """An int, or a sequence (one entry repeated), as ints; the caller checks the length."""
    if isinstance(v, (tuple, list)):
        values = tuple(int(x) for x in v)
        return values * n if len(values) == 1 else values
    return (int(v),) * n


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _conv_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    n = len(kernel)
    if padding == "valid":
        return (0,) * n
    if padding == "same":
        # torch pads total d*(K-1), the smaller half before: see
        # torch/nn/modules/conv.py (_reversed_padding_repeated_twice).
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    return _ntuple(padding, n)


def _conv_local(n: int, kernel, stride, padding, dilation, groups) -> Optional[LocalOp]:
    kernel, dilation = _ntuple(kernel, n), _ntuple(dilation, n)
    pad = _conv_padding(padding, kernel, dilation)
    stride = _ntuple(stride, n)
    if not len(kernel) == len(stride) == len(pad) == len(dilation) == n:
        return None
    return LocalOp("conv", kernel, stride, pad, dilation, 0.0, int(groups), full_pad=pad)


def _extract_conv_module(m: nn.Module, args, kwargs) -> Optional[LocalOp]:
    if m.padding_mode != "zeros":
        return None  # reflect/replicate/circular borders depend on the whole map
    return _conv_local(len(m.kernel_size), m.kernel_size, m.stride, m.padding, m.dilation, m.groups)


def _extract_conv_fn(_, args, kwargs) -> Optional[LocalOp]:
    weight = _arg(args, kwargs, 1, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (3, 4, 5):
        return None
    n = weight.dim() - 2
    return _conv_local(n, tuple(weight.shape[2:]), _arg(args, kwargs, 3, "stride", 1),
                       _arg(args, kwargs, 4, "padding", 0), _arg(args, kwargs, 5, "dilation", 1),
                       _arg(args, kwargs, 6, "groups", 1))


def _conv_transpose_local(n: int, kernel, stride, padding, dilation, groups) -> Optional[LocalOp]:
    kernel, stride, pad, dilation = (_ntuple(v, n) for v in (kernel, stride, padding, dilation))
    if not len(kernel) == len(stride) == len(pad) == len(dilation) == n:
        return None
    return LocalOp("conv_transpose", kernel, stride, pad, dilation, 0.0, int(groups))


def _extract_conv_transpose_module(m: nn.Module, args, kwargs) -> Optional[LocalOp]:
    # forward(x, output_size=None): output_size only sets output_padding, which only
    # shows in the output's size (PatchProp reads it from the result)
    return _conv_transpose_local(len(m.kernel_size), m.kernel_size, m.stride, m.padding, m.dilation, m.groups)


def _extract_conv_transpose_fn(_, args, kwargs) -> Optional[LocalOp]:
    weight = _arg(args, kwargs, 1, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (3, 4, 5):
        return None
    # F.conv_transposeNd(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _conv_transpose_local(weight.dim() - 2, tuple(weight.shape[2:]), _arg(args, kwargs, 3, "stride", 1),
                                 _arg(args, kwargs, 4, "padding", 0), _arg(args, kwargs, 7, "dilation", 1),
                                 _arg(args, kwargs, 6, "groups", 1))


def _shuffle_local(op: str, factor: Any, x: Any) -> Optional[LocalOp]:
    """Pixel (un)shuffle of a 2-D map: channels <-> ``factor x factor`` blocks (a 5-D
    tensor's depth would be mixed with its channels: not a local op there)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None
    r = (int(factor),) * 2
    return LocalOp(op, r, r, (0, 0))


def _resample_local(x: Any, size: Any, scale_factor: Any, mode: str, align_corners: Any,
                    recompute_scale_factor: Any, antialias: Any = False) -> Optional[LocalOp]:
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4, 5) or mode not in _RESAMPLE_MODES:
        return None
    n = x.dim() - 2
    scales = None
    if size is None and scale_factor is not None and not recompute_scale_factor:
        scales = tuple(float(v) for v in (scale_factor if isinstance(scale_factor, (tuple, list))
                                          else (scale_factor,) * n))
        if len(scales) != n:
            return None
    ones = (1,) * n
    return LocalOp("resample", ones, ones, (0,) * n,
                   resample=Resample(mode, align_corners, scales, bool(antialias)))


_RESAMPLE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")


def _extract_upsample_module(m: nn.Module, args, kwargs) -> Optional[LocalOp]:
    return _resample_local(args[0] if args else None, m.size, m.scale_factor, m.mode, m.align_corners,
                           m.recompute_scale_factor)


def _extract_interpolate_fn(_, args, kwargs) -> Optional[LocalOp]:
    # F.interpolate(input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)
    return _resample_local(*(_arg(args, kwargs, i, name, default) for i, (name, default) in enumerate(
        (("input", None), ("size", None), ("scale_factor", None), ("mode", "nearest"),
         ("align_corners", None), ("recompute_scale_factor", None), ("antialias", False)))))


def _window_stride(kernel: tuple[int, ...], stride: Any) -> tuple[int, ...]:
    return kernel if stride is None or stride == [] or stride == () else _ntuple(stride, len(kernel))


def _max_local(n: int, kernel, stride, padding, dilation, ceil_mode, return_indices) -> Optional[LocalOp]:
    if return_indices:
        return None
    kernel = _ntuple(kernel, n)
    pad = _ntuple(padding, n)
    return LocalOp("max", kernel, _window_stride(kernel, stride), pad, _ntuple(dilation, n), -math.inf,
                   ceil_mode=bool(ceil_mode), full_pad=pad)


def _avg_local(n: int, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> LocalOp:
    kernel = _ntuple(kernel, n)
    pad = _ntuple(padding, n)
    return LocalOp("avg", kernel, _window_stride(kernel, stride), pad, (1,) * n, 0.0, ceil_mode=bool(ceil_mode),
                   count_include_pad=bool(count_include_pad), divisor_override=divisor_override,
                   full_pad=pad)


def _extract_maxpool_module(m: nn.Module, args, kwargs):
    n = _POOL_DIMS[type(m)]
    return _max_local(n, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


def _maxpool_fn(n: int):
    def extract(_, args, kwargs):
        return _max_local(n, _arg(args, kwargs, 1, "kernel_size", None), _arg(args, kwargs, 2, "stride", None),
                          _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1),
                          _arg(args, kwargs, 5, "ceil_mode", False),
                          _arg(args, kwargs, 6, "return_indices", False))
    return extract


def _extract_avgpool_module(m: nn.Module, args, kwargs):
    n = _POOL_DIMS[type(m)]
    # AvgPool1d has no divisor_override
    return _avg_local(n, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                      getattr(m, "divisor_override", None))


def _avgpool_fn(n: int):
    def extract(_, args, kwargs):
        return _avg_local(n, _arg(args, kwargs, 1, "kernel_size", None), _arg(args, kwargs, 2, "stride", None),
                          _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "ceil_mode", False),
                          _arg(args, kwargs, 5, "count_include_pad", True),
                          _arg(args, kwargs, 6, "divisor_override", None) if n > 1 else None)
    return extract


def _pad_local(before: tuple[int, ...], n: int) -> LocalOp:
    """Constant padding as a local op: kernel 1, stride 1, ``pad`` = the padding before.

    Eqs. 21-28 then give an output box shifted by the padding and a read
    window equal to the input's own box: no gather, the op is the identity on
    the patch (the padded border never changes)."""
    return LocalOp("pad", (1,) * n, (1,) * n, tuple(before), (1,) * n, 0.0, full_pad=tuple(before))


def _spatial_pad(pad: Any, ndim: int) -> Optional[tuple[int, ...]]:
    """Padding before each spatial axis from ``F.pad``'s last-axis-first pairs, or None when it pads
    a non-spatial axis, crops (negative) or is malformed."""
    if not isinstance(pad, (tuple, list)) or len(pad) % 2 or len(pad) // 2 > ndim:
        return None
    pairs = [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(len(pad) // 2)]  # last axis first
    if any(a < 0 or b < 0 for a, b in pairs):
        return None
    pairs += [(0, 0)] * (ndim - len(pairs))
    return tuple(a for a, _ in reversed(pairs))


def _extract_pad_module(m: nn.Module, args, kwargs) -> Optional[LocalOp]:
    n = _PAD_DIMS[type(m)]
    if float(m.value) != m.value or not math.isfinite(float(m.value)):
        return None
    before = _spatial_pad(m.padding, n)
    return _pad_local(before, n) if before is not None else None


def _extract_pad_fn(_, args, kwargs) -> Optional[LocalOp]:
    x = _arg(args, kwargs, 0, "input", None)
    mode = _arg(args, kwargs, 2, "mode", "constant")
    value = _arg(args, kwargs, 3, "value", None)
    if not isinstance(x, torch.Tensor) or x.dim() < 3 or mode != "constant":
        return None
    if value is not None and not math.isfinite(float(value)):
        return None
    n = x.dim() - 2
    before = _spatial_pad(_arg(args, kwargs, 1, "pad", None), n)
    return _pad_local(before, n) if before is not None else None


def _shuffle_module(op: str):
    def extract(m: nn.Module, args, kwargs):
        return _shuffle_local(op, m.upscale_factor if op == "shuffle" else m.downscale_factor,
                              args[0] if args else None)
    return extract


def _shuffle_fn(op: str):
    def extract(_, args, kwargs):
        return _shuffle_local(op, _arg(args, kwargs, 1, "upscale_factor" if op == "shuffle" else "downscale_factor",
                                       1), _arg(args, kwargs, 0, "input", None))
    return extract


def _bn_eval(m: nn.modules.batchnorm._BatchNorm, args, kwargs) -> bool:
    # Without running statistics BatchNorm normalises over the batch and the
    # whole map even in eval mode: not a point op.
    return not m.training and m.track_running_stats and m.running_mean is not None


def _not_training(m: nn.Module, args, kwargs) -> bool:
    return not m.training


def _cat_on_channels(_, args, kwargs) -> bool:
    tensors = _arg(args, kwargs, 0, "tensors", ())
    dim = _arg(args, kwargs, 1, "dim", 0)
    ndim = next((t.dim() for t in tensors if isinstance(t, torch.Tensor)), 0)
    return ndim >= 3 and dim in (1, 1 - ndim)


def _dropout_fn_eval(_, args, kwargs) -> bool:
    return not _arg(args, kwargs, 2, "training", True)


def _batch_norm_fn_eval(_, args, kwargs) -> bool:
    return not _arg(args, kwargs, 5, "training", False) and _arg(args, kwargs, 1, "running_mean", None) is not None


POINT = Rule(Kind.POINT)
LOCAL_CONV_MODULE = Rule(Kind.LOCAL, extract=_extract_conv_module)

_POOL_DIMS: dict[type, int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
                               nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_PAD_DIMS: dict[type, int] = {nn.ConstantPad1d: 1, nn.ConstantPad2d: 2, nn.ConstantPad3d: 3,
                              nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3}

_MODULE_RULES: dict[type, Rule] = {
    nn.Conv1d: LOCAL_CONV_MODULE,
    nn.Conv2d: LOCAL_CONV_MODULE,
    nn.Conv3d: LOCAL_CONV_MODULE,
    nn.BatchNorm1d: Rule(Kind.POINT, check=_bn_eval),
    nn.BatchNorm2d: Rule(Kind.POINT, check=_bn_eval),
    nn.BatchNorm3d: Rule(Kind.POINT, check=_bn_eval),
    nn.Dropout: Rule(Kind.POINT, check=_not_training),
    nn.Dropout1d: Rule(Kind.POINT, check=_not_training),
    nn.Dropout2d: Rule(Kind.POINT, check=_not_training),
    nn.Dropout3d: Rule(Kind.POINT, check=_not_training),
    nn.AlphaDropout: Rule(Kind.POINT, check=_not_training),
    nn.PixelShuffle: Rule(Kind.LOCAL, extract=_shuffle_module("shuffle")),
    nn.PixelUnshuffle: Rule(Kind.LOCAL, extract=_shuffle_module("unshuffle")),
}
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    _MODULE_RULES[_t] = Rule(Kind.LOCAL, extract=_extract_conv_transpose_module)
for _t in (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
    _MODULE_RULES[_t] = Rule(Kind.LOCAL, extract=_extract_upsample_module)
for _t, _n in _POOL_DIMS.items():
    _MODULE_RULES[_t] = Rule(Kind.LOCAL, extract=_extract_maxpool_module if "Max" in _t.__name__
                             else _extract_avgpool_module)
for _t in _PAD_DIMS:
    _MODULE_RULES[_t] = Rule(Kind.LOCAL, extract=_extract_pad_module)
for _t in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
           nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Tanh, nn.Mish, nn.Softplus, nn.Hardtanh,
           nn.PReLU, nn.Identity):
    _MODULE_RULES[_t] = POINT

_FUNCTION_RULES: dict[Callable, Rule] = {
    F.conv1d: Rule(Kind.LOCAL, extract=_extract_conv_fn),
    F.conv2d: Rule(Kind.LOCAL, extract=_extract_conv_fn),
    F.conv3d: Rule(Kind.LOCAL, extract=_extract_conv_fn),
    torch.conv1d: Rule(Kind.LOCAL, extract=_extract_conv_fn),
    torch.conv2d: Rule(Kind.LOCAL, extract=_extract_conv_fn),
    torch.conv3d: Rule(Kind.LOCAL, extract=_extract_conv_fn),
    F.max_pool1d: Rule(Kind.LOCAL, extract=_maxpool_fn(1)),
    F.max_pool2d: Rule(Kind.LOCAL, extract=_maxpool_fn(2)),
    F.max_pool3d: Rule(Kind.LOCAL, extract=_maxpool_fn(3)),
    torch.max_pool1d: Rule(Kind.LOCAL, extract=_maxpool_fn(1)),
    torch.max_pool2d: Rule(Kind.LOCAL, extract=_maxpool_fn(2)),
    torch.max_pool3d: Rule(Kind.LOCAL, extract=_maxpool_fn(3)),
    F.avg_pool1d: Rule(Kind.LOCAL, extract=_avgpool_fn(1)),
    F.avg_pool2d: Rule(Kind.LOCAL, extract=_avgpool_fn(2)),
    F.avg_pool3d: Rule(Kind.LOCAL, extract=_avgpool_fn(3)),
    torch._C._nn.avg_pool2d: Rule(Kind.LOCAL, extract=_avgpool_fn(2)),
    torch._C._nn.avg_pool3d: Rule(Kind.LOCAL, extract=_avgpool_fn(3)),
    F.pad: Rule(Kind.LOCAL, extract=_extract_pad_fn),
    F.interpolate: Rule(Kind.LOCAL, extract=_extract_interpolate_fn),
    F.pixel_shuffle: Rule(Kind.LOCAL, extract=_shuffle_fn("shuffle")),
    F.pixel_unshuffle: Rule(Kind.LOCAL, extract=_shuffle_fn("unshuffle")),
    torch.cat: Rule(Kind.POINT, check=_cat_on_channels),
    torch.concat: Rule(Kind.POINT, check=_cat_on_channels),
    F.dropout: Rule(Kind.POINT, check=_dropout_fn_eval),
    F.dropout1d: Rule(Kind.POINT, check=_dropout_fn_eval),
    F.dropout2d: Rule(Kind.POINT, check=_dropout_fn_eval),
    F.dropout3d: Rule(Kind.POINT, check=_dropout_fn_eval),
    F.batch_norm: Rule(Kind.POINT, check=_batch_norm_fn_eval),
}
for _f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.conv_transpose1d,
           torch.conv_transpose2d, torch.conv_transpose3d):
    _FUNCTION_RULES[_f] = Rule(Kind.LOCAL, extract=_extract_conv_transpose_fn)
for _f in (F.relu, F.relu6, F.silu, F.gelu, F.sigmoid, F.hardswish, F.hardsigmoid, F.leaky_relu,
           F.elu, F.selu, F.celu, F.tanh, F.mish, F.softplus, F.hardtanh, torch.relu, torch.relu_,
           torch.sigmoid, torch.tanh, torch.add, torch.sub, torch.mul, torch.div, torch.neg,
           torch.clamp, torch.abs, operator.add, operator.sub, operator.mul, operator.truediv,
           operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.neg):
    _FUNCTION_RULES[_f] = POINT

_METHOD_RULES: dict[str, Rule] = {
    name: POINT
    for name in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "add", "add_", "sub", "sub_",
                 "mul", "mul_", "div", "div_", "neg", "clamp", "clamp_", "clamp_min", "contiguous",
                 "clone", "hardtanh", "hardtanh_")
}


def register_module(cls: type, rule: Rule) -> None:
    """Teach the registry a module type (e.g. a custom activation as ``Rule(Kind.POINT)``)."""
    _MODULE_RULES[cls] = rule


def register_function(fn: Callable, rule: Rule) -> None:
    """Teach the registry a function target."""
    _FUNCTION_RULES[fn] = rule


def register_method(name: str, rule: Rule) -> None:
    """Teach the registry a tensor method name."""
    _METHOD_RULES[name] = rule


_GLOBAL = Rule(Kind.GLOBAL)


def lookup(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Rule, Optional[nn.Module]]:
    """The rule for ``node`` and, for ``call_module`` nodes, its module.

    Module rules match the exact type: a subclass may override ``forward``
    (a weight-standardised conv, say), so it stays global unless registered.
    """
    if node.op == "call_module":
        mod = modules[node.target]
        return _MODULE_RULES.get(type(mod), _GLOBAL), mod
    if node.op == "call_function":
        return _FUNCTION_RULES.get(node.target, _GLOBAL), None
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target, _GLOBAL), None
    return _GLOBAL, None
