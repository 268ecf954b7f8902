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

__all__ = ["Kind", "Rule", "LocalOp", "lookup", "register_module", "register_function",
           "register_method"]


class Kind(enum.Enum):
    """The five kinds of docs/design.md."""

    SOURCE = "source"      # the image placeholder
    POINT = "point"        # elementwise in space; one or more inputs (merges are decided by PatchProp)
    LOCAL = "local"        # sliding window: conv / pool
    MERGE = "merge"        # elementwise over several feature maps (add, cat on channels)
    GLOBAL = "global"      # anything else


@dataclasses.dataclass(frozen=True)
class LocalOp:
    """Window parameters of a local op, normalised to two spatial axes.

    Attributes:
        op: ``"conv"``, ``"max"`` or ``"avg"``.
        kernel: ``(kh, kw)`` kernel size, before dilation.
        stride: ``(sh, sw)``.
        pad: ``(top, left)`` padding before the first element.
        dilation: ``(dh, dw)``.
        fill: value of out-of-image elements (0 for conv and avg, -inf for max).
        groups: conv groups (1 for pools).
        count_include_pad: avg-pool divisor convention.
        divisor_override: avg-pool divisor override.
        ceil_mode: pooling output-size convention.
        full_pad: the op's own padding argument, to build the divisor map.
    """

    op: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int] = (1, 1)
    fill: float = 0.0
    groups: int = 1
    count_include_pad: bool = True
    divisor_override: Optional[int] = None
    ceil_mode: bool = False
    full_pad: tuple[int, int] = (0, 0)

    @property
    def effective_kernel(self) -> tuple[int, int]:
        """Dilated extent ``d * (K - 1) + 1`` per axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How PatchProp treats one op.

    Attributes:
        kind: POINT, LOCAL, MERGE or GLOBAL. POINT ops with several spatial
            inputs become merges.
        extract: for LOCAL, ``(module, args, kwargs) -> LocalOp | None``; None
            means "not supported in this configuration: treat as global".
        data_args: positions of the arguments that carry feature maps (for
            LOCAL, the input; others must not depend on the image).
        check: for POINT, ``(module, args, kwargs) -> bool``; False makes the
            node global (e.g. ``torch.cat`` on a dimension other than channels).
    """

    kind: Kind
    extract: Optional[Callable[..., Optional[LocalOp]]] = None
    check: Optional[Callable[..., bool]] = None


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return (int(v), int(v))


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _conv_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> Optional[tuple[int, int]]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        # torch pads total d*(K-1), the smaller half before: see
        # torch/nn/modules/conv.py (_reversed_padding_repeated_twice).
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))  # type: ignore[return-value]
    return _pair(padding)


def _conv_local(kernel, stride, padding, dilation, groups) -> Optional[LocalOp]:
    kernel, dilation = _pair(kernel), _pair(dilation)
    pad = _conv_padding(padding, kernel, dilation)
    return LocalOp("conv", kernel, _pair(stride), pad, dilation, 0.0, int(groups), full_pad=pad)


def _extract_conv_module(m: nn.Conv2d, args, kwargs) -> Optional[LocalOp]:
    if m.padding_mode != "zeros":
        return None  # reflect/replicate/circular borders depend on the whole map
    return _conv_local(m.kernel_size, m.stride, m.padding, m.dilation, m.groups)


def _extract_conv_fn(_, args, kwargs) -> Optional[LocalOp]:
    weight = _arg(args, kwargs, 1, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return None
    return _conv_local(tuple(weight.shape[-2:]), _arg(args, kwargs, 3, "stride", 1),
                       _arg(args, kwargs, 4, "padding", 0), _arg(args, kwargs, 5, "dilation", 1),
                       _arg(args, kwargs, 6, "groups", 1))


def _max_local(kernel, stride, padding, dilation, ceil_mode, return_indices) -> Optional[LocalOp]:
    if return_indices:
        return None
    kernel = _pair(kernel)
    stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
    pad = _pair(padding)
    return LocalOp("max", kernel, stride, pad, _pair(dilation), -math.inf,
                   ceil_mode=bool(ceil_mode), full_pad=pad)


def _avg_local(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override) -> LocalOp:
    kernel = _pair(kernel)
    stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
    pad = _pair(padding)
    return LocalOp("avg", kernel, stride, pad, (1, 1), 0.0, ceil_mode=bool(ceil_mode),
                   count_include_pad=bool(count_include_pad), divisor_override=divisor_override,
                   full_pad=pad)


def _extract_maxpool_module(m: nn.MaxPool2d, args, kwargs):
    return _max_local(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)


def _extract_maxpool_fn(_, args, kwargs):
    return _max_local(_arg(args, kwargs, 1, "kernel_size", None), _arg(args, kwargs, 2, "stride", None),
                      _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1),
                      _arg(args, kwargs, 5, "ceil_mode", False), _arg(args, kwargs, 6, "return_indices", False))


def _extract_avgpool_module(m: nn.AvgPool2d, args, kwargs):
    return _avg_local(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                      m.divisor_override)


def _extract_avgpool_fn(_, args, kwargs):
    return _avg_local(_arg(args, kwargs, 1, "kernel_size", None), _arg(args, kwargs, 2, "stride", None),
                      _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "ceil_mode", False),
                      _arg(args, kwargs, 5, "count_include_pad", True),
                      _arg(args, kwargs, 6, "divisor_override", None))


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
    return ndim == 4 and dim in (1, -3)


def _dropout_fn_eval(_, args, kwargs) -> bool:
    return not _arg(args, kwargs, 2, "training", True)


def _batch_norm_fn_eval(_, args, kwargs) -> bool:
    return not _arg(args, kwargs, 5, "training", False) and _arg(args, kwargs, 1, "running_mean", None) is not None


POINT = Rule(Kind.POINT)
LOCAL_CONV_MODULE = Rule(Kind.LOCAL, extract=_extract_conv_module)

_MODULE_RULES: dict[type, Rule] = {
    nn.Conv2d: LOCAL_CONV_MODULE,
    nn.MaxPool2d: Rule(Kind.LOCAL, extract=_extract_maxpool_module),
    nn.AvgPool2d: Rule(Kind.LOCAL, extract=_extract_avgpool_module),
    nn.BatchNorm2d: Rule(Kind.POINT, check=_bn_eval),
    nn.Dropout: Rule(Kind.POINT, check=_not_training),
    nn.Dropout2d: Rule(Kind.POINT, check=_not_training),
    nn.AlphaDropout: Rule(Kind.POINT, check=_not_training),
}
for _t in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
           nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Tanh, nn.Mish, nn.Softplus, nn.Hardtanh,
           nn.PReLU, nn.Identity):
    _MODULE_RULES[_t] = POINT

_FUNCTION_RULES: dict[Callable, Rule] = {
    F.conv2d: Rule(Kind.LOCAL, extract=_extract_conv_fn),
    torch.conv2d: Rule(Kind.LOCAL, extract=_extract_conv_fn),
    F.max_pool2d: Rule(Kind.LOCAL, extract=_extract_maxpool_fn),
    torch.max_pool2d: Rule(Kind.LOCAL, extract=_extract_maxpool_fn),
    F.avg_pool2d: Rule(Kind.LOCAL, extract=_extract_avgpool_fn),
    torch._C._nn.avg_pool2d: Rule(Kind.LOCAL, extract=_extract_avgpool_fn),
    torch.cat: Rule(Kind.POINT, check=_cat_on_channels),
    torch.concat: Rule(Kind.POINT, check=_cat_on_channels),
    F.dropout: Rule(Kind.POINT, check=_dropout_fn_eval),
    F.batch_norm: Rule(Kind.POINT, check=_batch_norm_fn_eval),
}
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
