"""A drop-in for ``captum.attr.Occlusion`` backed by incremental inference.

``Occlusion(model).attribute(...)`` takes Captum's arguments and returns
Captum's result: for every input element, the difference between the
unoccluded and the occluded output for the target, averaged over the sliding
windows that cover the element. Window positions follow Captum: along each
dimension of size ``D`` with window ``w`` and stride ``s`` there are
``ceil((D - w) / s) + 1`` windows starting at ``0, s, 2s, ...``, so the last
one may be cut off at the border.

When the explained function is an ``nn.Module`` that traces, the input is one
``(N, C, H, W)`` image batch, the window spans all channels and the baseline
is constant over the window, the occluded outputs come from a compiled
incremental explainer (:func:`krypton_fx.compile`, ``output="logit"``); the
cut-off border windows, which the compiled grid does not hold, run as plain
occluded forwards. Everything else runs a plain implementation of the same
semantics. ``Occlusion.last_path`` says which one ran.

What a caller of Captum's class can observe is kept: the signature of
``attribute`` (and ``attribute.__wrapped__``), ``attribute_future`` raising
``NotImplementedError``, ``get_name()``, ``has_convergence_delta()``,
``multiplies_by_inputs``, ``forward_func``, ``use_weights``; a tensor back for a
tensor, a tuple for a tuple, float32 on the input's device; at most
``perturbations_per_eval * N`` images per forward; Captum's progress bar
(``"Occlusion attribution"``, counted in its forwards). A bad argument raises
:class:`OcclusionArgumentError`, a ``ValueError`` that says what to fix and an
``AssertionError`` as in Captum (and Captum's ``IndexError``, ``RuntimeError``
or ``TypeError`` where it raises one of those instead). Deliberate differences:
a stride < 1 or more baselines than inputs are refused (Captum returns NaN, or
ignores the extra ones), a non-callable ``forward_func`` is refused at once,
the progress bar reaches 100% (Captum's counts input elements, not windows),
and a 1-D input with window ``()`` works (Captum raises ``IndexError``).

Captum itself is not imported: it is only needed to compare against.

Example:
    >>> import torch, torchvision
    >>> from krypton_fx.captum import Occlusion
    >>> model = torchvision.models.resnet18(num_classes=10).eval()
    >>> occ = Occlusion(model)
    >>> attr = occ.attribute(torch.rand(2, 3, 48, 48), sliding_window_shapes=(3, 16, 16),
    ...                      strides=(3, 10, 10), target=[1, 7], perturbations_per_eval=16)
    >>> tuple(attr.shape), occ.last_path
    ((2, 3, 48, 48), 'incremental')
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import numbers
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .explainer import Explainer
from .explainer import compile as compile_explainer

__all__ = [
    "Occlusion",
    "OcclusionArgumentError",
    "OcclusionArgumentIndexError",
    "OcclusionArgumentRuntimeError",
    "OcclusionArgumentTypeError",
]

logger = logging.getLogger(__name__)

Baseline = Union[None, int, float, Tensor, tuple]
Target = Union[None, int, tuple, Tensor, list]

# Compiled explainers kept per Occlusion object (one per image size, window,
# stride and patch colour); per-example tensor baselines compile one per colour.
_MAX_CACHED_EXPLAINERS = 16


# --- argument errors ---------------------------------------------------------------------------


class OcclusionArgumentError(ValueError, AssertionError):
    """A bad argument to :class:`Occlusion`: a ``ValueError`` whose message says what to fix, and
    an ``AssertionError``, which is what ``captum.attr.Occlusion`` raises for it (its checks are
    asserts), so ``except AssertionError`` written for Captum still catches it.

    Example:
        >>> import torch
        >>> try:
        ...     Occlusion(torch.nn.Linear(4, 2)).attribute(torch.rand(1, 4), (5,))
        ... except AssertionError as e:
        ...     isinstance(e, ValueError)
        True
    """


class OcclusionArgumentTypeError(OcclusionArgumentError, TypeError):
    """An argument of the wrong type (Captum: ``AssertionError``, or ``TypeError``)."""


class OcclusionArgumentIndexError(OcclusionArgumentError, IndexError):
    """An index out of range, where Captum fails with ``IndexError`` (an int target past the
    classes, fewer baselines than inputs)."""


class OcclusionArgumentRuntimeError(OcclusionArgumentError, RuntimeError):
    """A bad argument that Captum only notices when a torch op fails (``RuntimeError``): a
    baseline that does not broadcast, a negative window, per-example classes out of range or
    not integers."""


# --- argument normalisation (Captum's forms) ------------------------------------------------


def _format_inputs(inputs) -> tuple[tuple[Tensor, ...], bool]:
    """Inputs as a tuple of tensors, and whether they came as a tuple."""
    if isinstance(inputs, Tensor):
        return (inputs,), False
    if isinstance(inputs, tuple) and inputs and all(isinstance(x, Tensor) for x in inputs):
        return inputs, True
    raise OcclusionArgumentTypeError("inputs must be a torch.Tensor or a non-empty tuple of tensors (one "
                                     f"per forward argument), got {_describe(inputs)}")


def _describe(value) -> str:
    if isinstance(value, tuple):
        return "tuple(" + ", ".join(type(v).__name__ for v in value) + ")"
    return type(value).__name__


def _int_tuple(value, what: str) -> tuple[int, ...]:
    # Captum asserts tuples (torch.Size is one): a list fails there, so it fails here too.
    if not isinstance(value, tuple):
        hint = f"; pass tuple({value!r})" if isinstance(value, list) else ""
        raise OcclusionArgumentTypeError(f"{what} must be a tuple of ints, got {value!r}{hint}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise OcclusionArgumentTypeError(f"{what} must be a tuple of ints, got {value!r}")
        out.append(int(v))
    return tuple(out)


def _format_windows(sliding_window_shapes, inputs: tuple[Tensor, ...]) -> tuple[tuple[int, ...], ...]:
    """One window shape per input, each with ``input.dim() - 1`` entries (Captum's rules)."""
    if not isinstance(sliding_window_shapes, tuple):
        hint = f"; pass tuple({sliding_window_shapes!r})" if isinstance(sliding_window_shapes, list) else ""
        raise OcclusionArgumentTypeError("sliding_window_shapes must be a tuple of ints (one input) or a "
                                         f"tuple of such tuples (one per input), got "
                                         f"{sliding_window_shapes!r}{hint}")
    shapes = tuple(sliding_window_shapes)
    if len(shapes) == 0 or isinstance(shapes[0], numbers.Integral):
        shapes = (shapes,)  # a single input's window; () is the window of a 1-D input
    if len(shapes) != len(inputs):
        raise OcclusionArgumentError(f"sliding_window_shapes gives {len(shapes)} window(s) for {len(inputs)} "
                                     "input(s): give one window shape per input tensor")
    windows = []
    for i, (shape, x) in enumerate(zip(shapes, inputs)):
        window = _int_tuple(shape, f"sliding_window_shapes[{i}]")
        dims = tuple(x.shape[1:])
        if len(window) != len(dims):
            raise OcclusionArgumentError(f"sliding window {window} for input {i} of shape {tuple(x.shape)} "
                                         f"must have {len(dims)} entries, one per dimension after the batch "
                                         "dimension")
        if any(w < 1 for w in window):
            raise OcclusionArgumentRuntimeError(f"sliding window {window} for input {i} has an entry < 1; "
                                                "every window dimension must be at least 1")
        if any(w > d for w, d in zip(window, dims)):
            raise OcclusionArgumentError(f"sliding window {window} for input {i} is larger than the input's "
                                         f"dimensions {dims}; use a smaller window")
        windows.append(window)
    return tuple(windows)


def _format_strides(strides, inputs: tuple[Tensor, ...],
                    windows: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """One stride per dimension per input (Captum's rules, expanded)."""
    if strides is None:
        strides = tuple(1 for _ in inputs)
    if len(inputs) == 1 and not (isinstance(strides, tuple) and len(strides) == 1):
        strides = (strides,)
    if not isinstance(strides, tuple) or len(strides) != len(inputs):
        raise OcclusionArgumentError(f"strides {strides!r} must give one stride (an int or a tuple per "
                                     f"dimension) for each of the {len(inputs)} input tensors")
    out = []
    for i, (stride, window) in enumerate(zip(strides, windows)):
        if isinstance(stride, numbers.Integral) and not isinstance(stride, bool):
            per_dim = (int(stride),) * len(window)
        else:
            per_dim = _int_tuple(stride, f"strides[{i}]")
            if len(per_dim) != len(window):
                raise OcclusionArgumentError(f"strides[{i}] = {per_dim} must be an int or have {len(window)} "
                                             f"entries, one per dimension of input {i} after the batch "
                                             "dimension")
        # Captum accepts a stride < 1 and returns NaN (it divides by the stride): refuse it.
        if any(s < 1 for s in per_dim):
            raise OcclusionArgumentError(f"strides[{i}] = {per_dim} has an entry < 1; strides must be positive")
        dims = tuple(inputs[i].shape[1:])
        for d, (s, w, size) in enumerate(zip(per_dim, window, dims)):
            if w < size and s > w:
                raise OcclusionArgumentError(f"stride {s} along dimension {d + 1} of input {i} is larger than "
                                             f"the window ({w}), so some elements would never be occluded; "
                                             f"use a stride <= {w}")
        out.append(per_dim)
    return tuple(out)


def _format_baselines(baselines: Baseline, inputs: tuple[Tensor, ...]) -> tuple[Union[Tensor, int, float], ...]:
    """One baseline per input: 0 when none; tensors must broadcast to the input."""
    if baselines is None:
        return tuple(False if x.dtype is torch.bool else 0 for x in inputs)
    if not isinstance(baselines, tuple):
        baselines = (baselines,)
    # Captum checks every baseline's type first, then fails on too few (IndexError) and ignores
    # extra ones; an extra one is refused here.
    for i, b in enumerate(baselines):
        if not isinstance(b, (Tensor, int, float)):
            raise OcclusionArgumentTypeError(f"baselines[{i}] must be a number or a torch.Tensor, got "
                                             f"{type(b).__name__}")
    if len(baselines) != len(inputs):
        raise OcclusionArgumentIndexError(f"baselines gives {len(baselines)} value(s) for {len(inputs)} "
                                          "input(s): give one scalar or tensor per input tensor")
    for i, (b, x) in enumerate(zip(baselines, inputs)):
        if isinstance(b, Tensor):
            # Captum prepends a perturbation dimension and broadcasts against
            # (perturbations, *input.shape): the baseline must not widen it.
            full = (1, *x.shape)
            try:
                ok = torch.broadcast_shapes(full, (1, *b.shape)) == torch.Size(full)
            except RuntimeError:
                ok = False
            if not ok:
                raise OcclusionArgumentRuntimeError(
                    f"baseline {i} of shape {tuple(b.shape)} does not broadcast to its input's shape "
                    f"{tuple(x.shape)}; give a scalar, a tensor of the input's shape, or one broadcastable "
                    "to it such as (1, C, 1, 1)")
    return baselines


def _shift_counts(dims: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """Windows per dimension: ``ceil((D - w) / s) + 1``, the last one possibly cut off."""
    return tuple(-(-(d - w) // s) + 1 for d, w, s in zip(dims, window, stride))


def _window_masks_1d(count: int, size: int, window: int, stride: int, device) -> Tensor:
    """``(count, size)`` bool: element ``y`` lies in window ``k`` (``k*s <= y < k*s + w``)."""
    starts = torch.arange(count, device=device).unsqueeze(1) * stride
    ar = torch.arange(size, device=device).unsqueeze(0)
    return (ar >= starts) & (ar < starts + window)


# --- targets and forward calls (Captum's semantics) -------------------------------------------


def _as_output_tensor(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (int, float)) and not isinstance(output, bool):
        return torch.tensor(output, dtype=torch.int64 if isinstance(output, int) else torch.float64)
    raise OcclusionArgumentTypeError(f"forward_func must return a tensor, int or float, got "
                                     f"{type(output).__name__}")


def _select_targets(output: Tensor, target: Target) -> Tensor:
    """The output entries ``target`` names, per example (``captum._utils.common._select_targets``)."""
    if target is None:
        return output
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        target = int(target)
    if isinstance(target, (int, tuple)):
        index = (target,) if isinstance(target, int) else target
        if len(index) > output.dim() - 1:
            raise OcclusionArgumentError(f"target {target!r} indexes {len(index)} output dimension(s) but the "
                                         f"output has shape {tuple(output.shape)}; give one index per "
                                         "dimension after the batch")
        try:
            return output[(slice(None), *index)]
        except IndexError as e:
            raise OcclusionArgumentIndexError(f"target {target!r} is out of range for output shape "
                                              f"{tuple(output.shape)}") from e
    num_examples = output.shape[0] if output.dim() else 0
    if isinstance(target, Tensor):
        if target.numel() == 1 and not target.is_floating_point() and not target.is_complex():
            return _select_targets(output, int(target.item()))
        if target.dim() == 1 and target.numel() == num_examples:
            return _gather_per_example(output, target.to(output.device))
        raise OcclusionArgumentError(f"target tensor of shape {tuple(target.shape)} does not fit output shape "
                                     f"{tuple(output.shape)}: give one integer, or a 1-D tensor with one class "
                                     "per example")
    if isinstance(target, list):
        if len(target) != num_examples:
            raise OcclusionArgumentError(f"target list has {len(target)} entries but the output has "
                                         f"{num_examples} examples: give one target per example")
        if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target):
            return _gather_per_example(output, torch.tensor([int(t) for t in target], device=output.device))
        if all(isinstance(t, tuple) for t in target):
            try:
                return torch.stack([output[(i, *t)] for i, t in enumerate(target)])
            except IndexError as e:
                raise OcclusionArgumentIndexError(f"target {target!r} is out of range for output shape "
                                                  f"{tuple(output.shape)}") from e
        raise OcclusionArgumentTypeError("a target list must hold ints (one class per example) or tuples (one "
                                         f"output index per example), got {[type(t).__name__ for t in target]}")
    raise OcclusionArgumentTypeError(f"target must be None, an int, a tuple, a list or a tensor, got "
                                     f"{type(target).__name__}")


def _gather_per_example(output: Tensor, classes: Tensor) -> Tensor:
    if output.dim() != 2:
        raise OcclusionArgumentError(f"a per-example target needs an output of shape (N, classes), got "
                                     f"{tuple(output.shape)}; use a single int or tuple target instead")
    # Captum's torch.gather fails on these with RuntimeError.
    if classes.is_floating_point() or classes.is_complex() or classes.dtype is torch.bool:
        raise OcclusionArgumentRuntimeError(f"target tensor must hold integer class indices, got dtype "
                                            f"{classes.dtype}")
    classes = classes.long()
    if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= output.shape[1]):
        raise OcclusionArgumentRuntimeError(f"target classes {classes.tolist()} are out of range: the output "
                                            f"has {output.shape[1]} classes (0..{output.shape[1] - 1})")
    return torch.gather(output, 1, classes.reshape(len(output), 1)).squeeze(-1)


def _expand_target(target: Target, copies: int) -> Target:
    """The target for ``copies`` stacked copies of the batch."""
    if isinstance(target, list):
        return target * copies
    if isinstance(target, Tensor) and target.numel() > 1:
        return torch.cat([target] * copies, dim=0)
    return target


def _expand_forward_args(args: Optional[tuple], copies: int) -> Optional[tuple]:
    """Tensors with a batch dimension are repeated with the inputs; the rest pass through."""
    if args is None:
        return None
    return tuple(torch.cat([a] * copies, dim=0) if isinstance(a, Tensor) and a.dim() > 0 else a
                 for a in args)


def _takes_arguments(forward_func: Callable) -> bool:
    try:
        return len(inspect.signature(forward_func).parameters) > 0
    except (TypeError, ValueError):
        return True


def _run_forward(forward_func: Callable, inputs: tuple[Tensor, ...], target: Target,
                 extra_args: Optional[tuple]) -> Tensor:
    if _takes_arguments(forward_func):
        output = forward_func(*inputs, *(extra_args or ()))
    else:
        output = forward_func()
    return _select_targets(_as_output_tensor(output), target)


def _per_example_classes(target: Target, examples: int, classes: int) -> Optional[list[int]]:
    """The class each example's target selects from an ``(N, classes)`` output, or None."""
    if isinstance(target, Tensor) and target.numel() == 1 and not target.is_floating_point():
        target = int(target.item())
    if isinstance(target, tuple) and len(target) == 1:
        target = target[0]
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return [int(target) % classes] * examples  # negative ints index from the end, as in Captum
    if isinstance(target, Tensor) and target.dim() == 1 and target.numel() == examples:
        return [int(t) for t in target.tolist()]
    if isinstance(target, list) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                        for t in target):
        return [int(t) for t in target]
    return None


# --- progress (Captum's bar) -------------------------------------------------------------------


class _NoProgress:
    """The bar's interface, doing nothing (``show_progress=False``)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, desc: str, forwards: int):
    """Captum's bar: tqdm.auto on stderr, ``"<name> attribution"``, one step for the unoccluded
    forward and one per forward of ``perturbations_per_eval`` windows.

    Captum 0.9 counts its total in input elements instead of windows, so its bar stops short of
    100% whenever a window holds more than one element; this total is the forwards it runs.
    """
    if not enabled:
        return _NoProgress()
    bar = tqdm(total=forwards + 1, desc=desc, mininterval=0.5)
    bar.update(0)
    return bar


class _WindowProgress:
    """Moves a bar counted in Captum's forwards (``ppe`` windows of every example each) as the
    incremental path finishes windows of one example at a time."""

    def __init__(self, bar, forwards: int, windows: int):
        self.bar, self.forwards, self.windows = bar, forwards, windows
        self.done = self.shown = 0

    def advance(self, windows: int) -> None:
        self.done += windows
        reached = self.done * self.forwards // self.windows
        if reached > self.shown:
            self.bar.update(reached - self.shown)
            self.shown = reached


def _balanced_chunks(positions: int, cap: int) -> int:
    """The one chunk size for ``positions`` split into as few chunks of at most ``cap`` as possible,
    all of that size but the last (short by less than the number of chunks).

    A CUDA-graph runner is captured per batch size: one size per call keeps one graph, and the
    last chunk, padded to it, wastes fewer positions than the number of chunks.
    """
    chunks = -(-positions // max(1, cap))
    return -(-positions // max(1, chunks))


@dataclasses.dataclass(frozen=True)
class _IncrementalPlan:
    """Everything the incremental path needs for one call."""

    window: tuple[int, int]              # (h, w) of the window in the image plane
    stride: tuple[int, int]              # (sy, sx)
    colors: list[tuple[float, ...]]      # per example: the baseline's value per channel
    explainers: list[Explainer]          # per example: compiled for that example's colour
    classes: list[int]                   # per example: the class the target selects
    base: Tensor                         # (N,) float64: unoccluded output for the target


# --- the attribution class ------------------------------------------------------------------------


def _wrapped_like_captum(method: Callable) -> Callable:
    """Captum decorates ``attribute`` with ``log_usage`` (a ``functools.wraps`` wrapper), and its
    subclasses call ``super().attribute.__wrapped__(self, ...)`` to skip it: keep that handle.
    Nothing is logged."""

    @functools.wraps(method)
    def attribute(*args, **kwargs):
        return method(*args, **kwargs)

    return attribute



class Occlusion:
    """Occlusion attributions, the same as ``captum.attr.Occlusion``, computed incrementally.

    Args:
        forward_func: the model or function to explain. An ``nn.Module``
            classifier that traces gets the incremental path; anything else
            runs a plain implementation with the same results.

    As Captum's: :meth:`attribute` (with ``attribute.__wrapped__``), ``attribute_future``
    (``NotImplementedError``), ``get_name()``, ``has_convergence_delta()`` (False),
    ``multiplies_by_inputs`` (True), and the attributes ``forward_func`` and ``use_weights``.
    Bad arguments raise :class:`OcclusionArgumentError`, an ``AssertionError`` as in Captum.

    Attributes:
        forward_func: the explained callable; it may be replaced between calls.
        use_weights: True, as in Captum: attributions are averaged over the
            windows covering each element.
        last_path: ``"incremental"`` or ``"plain"``: how the last
            :meth:`attribute` call was computed.
        last_fallback_reason: why the last call could not go incremental
            (None when it did).
        last_stats: counts of the last call: ``positions`` (windows per
            example), ``incremental_positions`` and ``plain_forwards``
            (occluded images run through the model directly), ``compiles``,
            and on the incremental path ``batch_size`` (the positions of
            every incremental batch of the call).

    Example:
        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(6, 3))
        >>> attr = Occlusion(mlp).attribute(torch.rand(4, 6), sliding_window_shapes=(2,), target=0)
        >>> tuple(attr.shape)
        (4, 6)
    """

    def __init__(self, forward_func: Callable[..., Tensor]) -> None:
        if not callable(forward_func):
            raise OcclusionArgumentTypeError(f"forward_func must be callable (a model or function), got "
                                             f"{type(forward_func).__name__}")
        self.forward_func = forward_func
        self.use_weights = True
        self.last_path: Optional[str] = None
        self.last_fallback_reason: Optional[str] = None
        self.last_stats: dict = {}
        self._explainers: OrderedDict[tuple, Union[Explainer, str]] = OrderedDict()
        self._explainers_of: Optional[Callable] = forward_func  # the forward_func they were compiled from

    @classmethod
    def get_name(cls) -> str:
        """The class name with a space before each capital but the first, as Captum writes it
        (``"Occlusion"``; it titles the progress bar)."""
        return "".join(c if c.islower() or i == 0 else " " + c for i, c in enumerate(cls.__name__))

    @property
    def multiplies_by_inputs(self) -> bool:
        """True, as for every Captum perturbation method."""
        return True

    def has_convergence_delta(self) -> bool:
        """False: occlusion has no convergence delta (as in Captum)."""
        return False

    def attribute_future(self) -> None:
        """Not implemented, as in Captum's Occlusion."""
        raise NotImplementedError("attribute_future is not implemented for Occlusion")

    @_wrapped_like_captum
    def attribute(self, inputs: Union[Tensor, tuple[Tensor, ...]],
                  sliding_window_shapes: Union[tuple[int, ...], tuple[tuple[int, ...], ...]],
                  strides: Union[None, int, tuple] = None, baselines: Baseline = None,
                  target: Target = None, additional_forward_args: Any = None,
                  perturbations_per_eval: int = 1,
                  show_progress: bool = False) -> Union[Tensor, tuple[Tensor, ...]]:
        """Attribution of every input element: the mean output drop over the windows covering it.

        Arguments and result are those of ``captum.attr.Occlusion.attribute``.

        Args:
            inputs: a tensor, or a tuple of tensors (one per forward argument),
                with the examples along dimension 0.
            sliding_window_shapes: the window (one entry per dimension after
                the batch), or a tuple of windows, one per input.
            strides: an int, a tuple per dimension, or one of those per input;
                None means 1 everywhere.
            baselines: the occluding value: a number, a tensor broadcastable to
                the input, or one of those per input; None means 0.
            target: the output to explain: an int or tuple for every example,
                or a list / 1-D tensor with one class per example.
            additional_forward_args: extra forward arguments after the inputs;
                tensors are repeated along dimension 0 with the inputs.
            perturbations_per_eval: windows evaluated in one forward call (each
                call holds ``perturbations_per_eval * N`` images).
            show_progress: show Captum's progress bar on stderr
                (``"Occlusion attribution"``: one step for the unoccluded
                forward and one per ``perturbations_per_eval`` windows).

        Returns:
            float32 attributions on the input's device, shaped like ``inputs``
            (a tuple when ``inputs`` is a tuple); dimension 0 is the number of
            selected outputs (``N`` for one target per example).

        Raises:
            OcclusionArgumentError: a bad argument (a ``ValueError`` and an
                ``AssertionError``, and whatever else Captum raises for it).

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
            ...                           torch.nn.Linear(144, 2)).eval()
            >>> occ = Occlusion(net)
            >>> attr = occ.attribute(torch.rand(1, 1, 8, 8), (1, 4, 4), strides=(1, 3, 3), target=1)
            >>> tuple(attr.shape)
            (1, 1, 8, 8)
        """
        formatted, is_tuple = _format_inputs(inputs)
        windows = _format_windows(sliding_window_shapes, formatted)
        stride_dims = _format_strides(strides, formatted, windows)
        base_values = _format_baselines(baselines, formatted)
        if not isinstance(perturbations_per_eval, int) or isinstance(perturbations_per_eval, bool):
            # Captum: AssertionError, or TypeError for a bool (it passes its isinstance(int) check)
            raise OcclusionArgumentTypeError(f"perturbations_per_eval must be an int >= 1, got "
                                             f"{perturbations_per_eval!r}")
        if perturbations_per_eval < 1:
            raise OcclusionArgumentError(f"perturbations_per_eval must be an int >= 1, got "
                                         f"{perturbations_per_eval!r}")
        if additional_forward_args is not None and not isinstance(additional_forward_args, tuple):
            additional_forward_args = (additional_forward_args,)
        if self.forward_func is not self._explainers_of:  # replaced since they were compiled
            self._explainers.clear()
            self._explainers_of = self.forward_func

        windows_total = sum(math.prod(_shift_counts(x.shape[1:], w, s))
                            for x, w, s in zip(formatted, windows, stride_dims))
        self.last_stats = {"compiles": 0}
        bar = _progress_bar(show_progress, f"{self.get_name()} attribution",
                            math.ceil(windows_total / perturbations_per_eval))
        try:
            with torch.no_grad():
                plan = self._incremental_plan(formatted, windows, stride_dims, base_values, target,
                                              additional_forward_args)
                if isinstance(plan, _IncrementalPlan):
                    attributions = self._attribute_incremental(formatted[0], plan, perturbations_per_eval,
                                                               bar)
                    self.last_path, self.last_fallback_reason = "incremental", None
                else:
                    logger.debug("Occlusion: plain path: %s", plan)
                    attributions = self._attribute_plain(formatted, windows, stride_dims, base_values, target,
                                                         additional_forward_args, perturbations_per_eval, bar)
                    self.last_path, self.last_fallback_reason = "plain", plan
        finally:
            bar.close()
        return attributions if is_tuple else attributions[0]

    # --- incremental path ---------------------------------------------------------------------

    def _incremental_plan(self, inputs, windows, strides, baselines, target, extra_args) -> Union[_IncrementalPlan, str]:
        """What the incremental path needs (explainers, classes, unoccluded outputs), or why it
        does not apply."""
        model = self.forward_func
        if not isinstance(model, nn.Module):
            return "forward_func is not an nn.Module"
        if len(inputs) != 1:
            return "there is more than one input tensor"
        if extra_args is not None:
            return "additional_forward_args are given"
        x = inputs[0]
        if x.dim() != 4 or x.numel() == 0:
            return f"the input is not a non-empty (N, C, H, W) image batch (shape {tuple(x.shape)})"
        n, c = x.shape[:2]
        if windows[0][0] != c:
            return "the window does not span all channels"
        if tuple(windows[0][1:]) == tuple(x.shape[2:]):
            return "the window covers the whole image: one position, nothing to reuse"
        if target is None:
            return "no target: the attribution is per output entry"
        if any(m.training for m in model.modules()):
            return "the model is in training mode (call model.eval() for the incremental path)"
        param = next(model.parameters(), None)
        if param is not None and (param.dtype != x.dtype or param.device != x.device):
            return "the input's dtype or device differs from the model's"
        if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
            return "the input is not a finite floating-point tensor"
        colors = self._window_colors(baselines[0], x)
        if isinstance(colors, str):
            return colors
        window, stride = windows[0][1:], strides[0][1:]
        explainers = [self._explainer(x, window, stride, col) for col in colors]
        failed = next((e for e in explainers if isinstance(e, str)), None)
        if failed is not None:
            return failed
        initial = _as_output_tensor(model(x))
        selected = _select_targets(initial, target)  # raises on a bad target, as the plain path would
        if initial.dim() != 2 or initial.shape[0] != n:
            return "the model does not return one row of class scores per example"
        classes = _per_example_classes(target, n, initial.shape[1])
        if classes is None:
            return "the target does not pick one class per example"
        return _IncrementalPlan(window, stride, colors, explainers, classes,
                                selected.to(torch.float64).cpu())

    @staticmethod
    def _window_colors(baseline, x: Tensor) -> Union[list[tuple[float, ...]], str]:
        """One per-channel colour per example, or why the baseline is not constant over a window."""
        n, c = x.shape[:2]
        if not isinstance(baseline, Tensor):
            value = float(baseline)
            return [(value,) * c] * n if math.isfinite(value) else "the baseline is not finite"
        full = torch.broadcast_to(baseline.reshape((1, *baseline.shape)), (1, *x.shape))[0]
        corner = full[:, :, :1, :1]
        if not bool((full == corner).all()):
            return "the baseline varies inside the window"
        if not bool(torch.isfinite(corner).all()):
            return "the baseline is not finite"
        return [tuple(float(v) for v in corner[i, :, 0, 0].tolist()) for i in range(n)]

    def _explainer(self, x: Tensor, window, stride, color: tuple[float, ...]) -> Union[Explainer, str]:
        """The cached explainer for this image size, window, stride and colour (compiled once)."""
        key = (tuple(x.shape[1:]), tuple(window), tuple(stride), color, str(x.device))
        if key in self._explainers:
            self._explainers.move_to_end(key)
            return self._explainers[key]
        try:
            ex: Union[Explainer, str] = compile_explainer(
                self.forward_func, patch=tuple(window), stride=tuple(stride), color=list(color),
                image_size=tuple(x.shape[2:]), device=x.device, output="logit", channels=x.shape[1])
            self.last_stats["compiles"] += 1
        except Exception as e:  # noqa: BLE001 - TraceError and any other compile failure: go plain
            ex = f"the model does not compile for incremental occlusion: {type(e).__name__}: {e}"
        self._explainers[key] = ex
        if len(self._explainers) > _MAX_CACHED_EXPLAINERS:
            self._explainers.popitem(last=False)
        return ex

    def _attribute_incremental(self, x: Tensor, plan: _IncrementalPlan, ppe: int, bar) -> tuple[Tensor, ...]:
        model = self.forward_func
        n, c, height, width = x.shape
        (wh, ww), (sh, sw) = plan.window, plan.stride
        explainers, classes = plan.explainers, plan.classes

        # Captum's grid has one more row/column than the compiled one when the
        # last window is cut off at the border; those run as plain forwards.
        rows, cols = _shift_counts((height, width), (wh, ww), (sh, sw))
        grid = explainers[0].grid
        border = [(i, j) for i in range(rows) for j in range(cols) if i >= grid[0] or j >= grid[1]]
        batch = ppe * n  # the images Captum puts in one forward call
        inner = explainers[0].positions
        # Every incremental batch of the call has the same size (at most Captum's), the last
        # one of each example padded by repeating its last position.
        chunk = _balanced_chunks(inner, batch)
        bar.update(1)  # the unoccluded forward, run by the plan
        progress = _WindowProgress(bar, math.ceil(rows * cols / ppe), n * rows * cols)

        occluded = torch.empty(n, rows, cols, dtype=torch.float64)
        positions = torch.arange(inner)
        for k, (ex, label) in enumerate(zip(explainers, classes)):
            _, stored = ex.prepare(x[k])
            scores = torch.empty(inner, dtype=torch.float32)
            for lo in range(0, inner, chunk):
                part = positions[lo:lo + chunk]
                padded = torch.cat([part, part[-1:].expand(chunk - len(part))])
                scores[lo:lo + len(part)] = ex.run_positions(padded, stored, label,
                                                             batch_size=chunk)[:len(part)]
                progress.advance(len(part))
            occluded[k, :grid[0], :grid[1]] = scores.view(grid).double()
            color = torch.tensor(plan.colors[k], dtype=x.dtype, device=x.device).view(c, 1, 1)
            for lo in range(0, len(border), batch):
                cells = border[lo:lo + batch]
                images = x[k].unsqueeze(0).repeat(len(cells), 1, 1, 1)
                for b, (i, j) in enumerate(cells):
                    images[b, :, i * sh:i * sh + wh, j * sw:j * sw + ww] = color  # slicing cuts at the border
                out = _as_output_tensor(model(images))[:, label].double().cpu()
                for b, (i, j) in enumerate(cells):
                    occluded[k, i, j] = out[b]
                progress.advance(len(cells))

        drop = plan.base.view(n, 1, 1) - occluded
        # Sum over each element's covering windows: a transposed convolution of
        # the per-window drops with a window of ones, cropped to the image.
        ones = torch.ones(1, 1, wh, ww, dtype=torch.float64)
        totals = F.conv_transpose2d(drop.unsqueeze(1), ones, stride=(sh, sw))[:, :, :height, :width]
        counts = F.conv_transpose2d(torch.ones(1, 1, rows, cols, dtype=torch.float64), ones,
                                    stride=(sh, sw))[:, :, :height, :width]
        attribution = (totals / counts).float().expand(n, c, height, width).contiguous()
        self.last_stats.update(positions=rows * cols, incremental_positions=inner * n,
                               plain_forwards=len(border) * n, batch_size=chunk)
        return (attribution.to(x.device),)

    # --- plain path -----------------------------------------------------------------------------

    def _attribute_plain(self, inputs: tuple[Tensor, ...], windows, strides, baselines, target,
                         extra_args: Optional[tuple], ppe: int, bar) -> tuple[Tensor, ...]:
        """Captum's algorithm: windows of all inputs in one sequence, ``ppe`` per forward call."""
        counts = [_shift_counts(x.shape[1:], w, s) for x, w, s in zip(inputs, windows, strides)]
        features = [math.prod(sc) for sc in counts]
        first_feature = [sum(features[:i]) for i in range(len(inputs))]
        total_features = sum(features)
        examples = inputs[0].shape[0]

        initial = _run_forward(self.forward_func, inputs, target, extra_args)
        n_outputs = initial.numel()
        flat_initial = initial.reshape(1, -1)
        totals = [torch.zeros((n_outputs, *x.shape[1:]), dtype=flat_initial.dtype, device=x.device)
                  for x in inputs]
        bar.update(1)
        shape_checked = ppe == 1
        for lo in range(0, total_features, ppe):
            hi = min(lo + ppe, total_features)
            k = hi - lo
            involved = [i for i in range(len(inputs))
                        if first_feature[i] < hi and first_feature[i] + features[i] > lo]
            if all(inputs[i].numel() == 0 for i in involved):
                bar.update(1)  # Captum skips these windows of empty inputs (and its bar stops short)
                continue
            repeated = tuple(torch.cat([x] * k, dim=0) if k > 1 else x for x in inputs)
            masks: dict[int, Tensor] = {}
            ablated = list(repeated)
            for i in involved:
                x = repeated[i]
                local = torch.arange(lo, hi, device=x.device) - first_feature[i]
                mask = self._window_masks(local, features[i], x.shape[1:], windows[i], strides[i],
                                          counts[i]).unsqueeze(1)  # (k, 1, *dims)
                masks[i] = mask
                baseline = baselines[i]
                if isinstance(baseline, Tensor):
                    baseline = baseline.reshape((1, *baseline.shape))
                # The same arithmetic as Captum (not a where), so NaN/inf propagate alike.
                blended = (x.reshape((k, -1, *x.shape[1:])) * (1 - mask).to(x.dtype)
                           + baseline * mask.to(x.dtype))
                ablated[i] = blended.reshape(x.shape)
            modified = _run_forward(self.forward_func, tuple(ablated), _expand_target(target, k),
                                    _expand_forward_args(extra_args, k))
            if not shape_checked:
                self._check_output_grows(inputs, initial, modified, k)
                shape_checked = True
            drop = flat_initial - modified.reshape(-1, n_outputs)  # (k, n_outputs)
            for i, mask in masks.items():
                if inputs[i].numel() == 0:
                    continue
                spread = drop.reshape(drop.shape + (1,) * (inputs[i].dim() - 1)).to(totals[i].device)
                totals[i] += (spread * mask.to(totals[i].dtype)).sum(dim=0)
            bar.update(1)

        result = []
        for x, total, window, stride, sc in zip(inputs, totals, windows, strides, counts):
            weight = torch.ones((), device=x.device)
            for d, (size, w, s, cnt) in enumerate(zip(x.shape[1:], window, stride, sc)):
                per_dim = _window_masks_1d(cnt, size, w, s, x.device).sum(0).float()
                weight = weight.unsqueeze(-1) * per_dim
            result.append(total.float() / weight)
        self.last_stats.update(positions=total_features, incremental_positions=0,
                               plain_forwards=total_features * examples)
        return tuple(result)

    @staticmethod
    def _window_masks(local: Tensor, features: int, dims, window, stride, counts) -> Tensor:
        """``(k, *dims)`` float32 masks of windows ``local`` (dimension 0 varies fastest, as in
        Captum); entries outside ``[0, features)`` belong to another input and get an empty mask."""
        valid = (local >= 0) & (local < features)
        index = local.clamp(0, max(features - 1, 0))
        mask = valid.clone()
        for size, w, s, cnt in zip(dims, window, stride, counts):
            along = _window_masks_1d(cnt, size, w, s, local.device)[index % cnt]  # (k, size)
            index = index // cnt
            mask = mask.unsqueeze(-1) & along.view(len(local), *([1] * (mask.dim() - 1)), size)
        return mask.float()

    @staticmethod
    def _check_output_grows(inputs, initial: Tensor, modified: Tensor, copies: int) -> None:
        """With several windows per call the output must grow with the batch (no aggregation)."""
        expected = copies * initial.shape[0] if initial.dim() else None
        if expected is None or modified.dim() == 0 or modified.shape[0] != expected:
            raise OcclusionArgumentError(
                f"forward_func returned shape {tuple(modified.shape)} for {copies} stacked copies of a "
                f"batch whose output has shape {tuple(initial.shape)}: with perturbations_per_eval > 1 "
                "its output must grow with the batch; use perturbations_per_eval=1 for an aggregating "
                "forward_func")
