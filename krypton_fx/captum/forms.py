"""Captum's argument forms, targets, forward calls, errors and progress bar, normalised.

The helpers behind :class:`krypton_fx.captum.Occlusion` and
:class:`krypton_fx.captum.FeatureAblation`: they take Captum's argument forms
(tuples per input, targets, baselines, feature masks), check them as Captum
does, and raise :class:`CaptumArgumentError` (a ``ValueError`` that says what
to fix, and an ``AssertionError`` as in Captum) for a bad one.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["CaptumArgumentError", "CaptumArgumentTypeError", "CaptumArgumentIndexError",
           "CaptumArgumentRuntimeError", "OcclusionArgumentError", "OcclusionArgumentTypeError",
           "OcclusionArgumentIndexError", "OcclusionArgumentRuntimeError", "Baseline", "Target"]

Baseline = Union[None, int, float, Tensor, tuple]
Target = Union[None, int, tuple, Tensor, list]


# --- argument errors ---------------------------------------------------------------------------


class CaptumArgumentError(ValueError, AssertionError):
    """A bad argument to a Captum drop-in (:class:`Occlusion`, :class:`FeatureAblation`): a
    ``ValueError`` whose message says what to fix, and an ``AssertionError``, which is what
    Captum raises for it (its checks are asserts), so ``except AssertionError`` written for
    Captum still catches it.

    Example:
        >>> import torch
        >>> try:
        ...     Occlusion(torch.nn.Linear(4, 2)).attribute(torch.rand(1, 4), (5,))
        ... except AssertionError as e:
        ...     isinstance(e, ValueError)
        True
    """


class CaptumArgumentTypeError(CaptumArgumentError, TypeError):
    """An argument of the wrong type (Captum: ``AssertionError``, or ``TypeError``)."""


class CaptumArgumentIndexError(CaptumArgumentError, IndexError):
    """An index out of range, where Captum fails with ``IndexError`` (an int target past the
    classes, fewer baselines than inputs)."""


class CaptumArgumentRuntimeError(CaptumArgumentError, RuntimeError):
    """A bad argument that Captum only notices when a torch op fails (``RuntimeError``): a
    baseline or feature mask that does not broadcast, a negative window, per-example classes
    out of range or not integers."""


# The names the Occlusion drop-in has always raised: the same classes.
OcclusionArgumentError = CaptumArgumentError
OcclusionArgumentTypeError = CaptumArgumentTypeError
OcclusionArgumentIndexError = CaptumArgumentIndexError
OcclusionArgumentRuntimeError = CaptumArgumentRuntimeError


# --- argument normalisation (Captum's forms) ------------------------------------------------


def _format_inputs(inputs) -> tuple[tuple[Tensor, ...], bool]:
    """Inputs as a tuple of tensors, and whether they came as a tuple."""
    if isinstance(inputs, Tensor):
        return (inputs,), False
    if isinstance(inputs, tuple) and inputs and all(isinstance(x, Tensor) for x in inputs):
        return inputs, True
    raise CaptumArgumentTypeError("inputs must be a torch.Tensor or a non-empty tuple of tensors (one "
                                     f"per forward argument), got {_describe(inputs)}")


def _describe(value) -> str:
    if isinstance(value, tuple):
        return "tuple(" + ", ".join(type(v).__name__ for v in value) + ")"
    return type(value).__name__


def _int_tuple(value, what: str) -> tuple[int, ...]:
    # Captum asserts tuples (torch.Size is one): a list fails there, so it fails here too.
    if not isinstance(value, tuple):
        hint = f"; pass tuple({value!r})" if isinstance(value, list) else ""
        raise CaptumArgumentTypeError(f"{what} must be a tuple of ints, got {value!r}{hint}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise CaptumArgumentTypeError(f"{what} must be a tuple of ints, got {value!r}")
        out.append(int(v))
    return tuple(out)


def _format_windows(sliding_window_shapes, inputs: tuple[Tensor, ...]) -> tuple[tuple[int, ...], ...]:
    """One window shape per input, each with ``input.dim() - 1`` entries (Captum's rules)."""
    if not isinstance(sliding_window_shapes, tuple):
        hint = f"; pass tuple({sliding_window_shapes!r})" if isinstance(sliding_window_shapes, list) else ""
        raise CaptumArgumentTypeError("sliding_window_shapes must be a tuple of ints (one input) or a "
                                         f"tuple of such tuples (one per input), got "
                                         f"{sliding_window_shapes!r}{hint}")
    shapes = tuple(sliding_window_shapes)
    if len(shapes) == 0 or isinstance(shapes[0], numbers.Integral):
        shapes = (shapes,)  # a single input's window; () is the window of a 1-D input
    if len(shapes) != len(inputs):
        raise CaptumArgumentError(f"sliding_window_shapes gives {len(shapes)} window(s) for {len(inputs)} "
                                     "input(s): give one window shape per input tensor")
    windows = []
    for i, (shape, x) in enumerate(zip(shapes, inputs)):
        window = _int_tuple(shape, f"sliding_window_shapes[{i}]")
        dims = tuple(x.shape[1:])
        if len(window) != len(dims):
            raise CaptumArgumentError(f"sliding window {window} for input {i} of shape {tuple(x.shape)} "
                                         f"must have {len(dims)} entries, one per dimension after the batch "
                                         "dimension")
        if any(w < 1 for w in window):
            raise CaptumArgumentRuntimeError(f"sliding window {window} for input {i} has an entry < 1; "
                                                "every window dimension must be at least 1")
        if any(w > d for w, d in zip(window, dims)):
            raise CaptumArgumentError(f"sliding window {window} for input {i} is larger than the input's "
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
        raise CaptumArgumentError(f"strides {strides!r} must give one stride (an int or a tuple per "
                                     f"dimension) for each of the {len(inputs)} input tensors")
    out = []
    for i, (stride, window) in enumerate(zip(strides, windows)):
        if isinstance(stride, numbers.Integral) and not isinstance(stride, bool):
            per_dim = (int(stride),) * len(window)
        else:
            per_dim = _int_tuple(stride, f"strides[{i}]")
            if len(per_dim) != len(window):
                raise CaptumArgumentError(f"strides[{i}] = {per_dim} must be an int or have {len(window)} "
                                             f"entries, one per dimension of input {i} after the batch "
                                             "dimension")
        # Captum accepts a stride < 1 and returns NaN (it divides by the stride): refuse it.
        if any(s < 1 for s in per_dim):
            raise CaptumArgumentError(f"strides[{i}] = {per_dim} has an entry < 1; strides must be positive")
        dims = tuple(inputs[i].shape[1:])
        for d, (s, w, size) in enumerate(zip(per_dim, window, dims)):
            if w < size and s > w:
                raise CaptumArgumentError(f"stride {s} along dimension {d + 1} of input {i} is larger than "
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
            raise CaptumArgumentTypeError(f"baselines[{i}] must be a number or a torch.Tensor, got "
                                             f"{type(b).__name__}")
    if len(baselines) != len(inputs):
        raise CaptumArgumentIndexError(f"baselines gives {len(baselines)} value(s) for {len(inputs)} "
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
                raise CaptumArgumentRuntimeError(
                    f"baseline {i} of shape {tuple(b.shape)} does not broadcast to its input's shape "
                    f"{tuple(x.shape)}; give a scalar, a tensor of the input's shape, or one broadcastable "
                    "to it such as (1, C, 1, 1)")
    return baselines


def _format_feature_masks(feature_mask, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """One int64 feature-id mask per input, on the input's device, with the input's number of
    dimensions (leading ones added), every dimension 1 or the input's.

    None gives Captum's default: every element of every input its own feature, numbered
    consecutively across the inputs. A mask holds integer ids (float masks of whole numbers and
    bool masks are taken as such; Captum groups by equal values too).
    """
    if feature_mask is None:
        masks, first = [], 0
        for x in inputs:
            count = x[0:1].numel()
            masks.append(first + torch.arange(count, device=x.device).reshape(x[0:1].shape))
            first += count
        return tuple(masks)
    if isinstance(feature_mask, Tensor):
        feature_mask = (feature_mask,)
    if not isinstance(feature_mask, tuple) or not all(isinstance(m, Tensor) for m in feature_mask):
        raise CaptumArgumentTypeError(f"feature_mask must be a tensor or a tuple of tensors (one per input), "
                                      f"got {_describe(feature_mask)}")
    if len(feature_mask) != len(inputs):
        raise CaptumArgumentIndexError(f"feature_mask gives {len(feature_mask)} mask(s) for {len(inputs)} "
                                       "input(s): give one mask per input tensor")
    return tuple(_format_one_mask(m, x, i) for i, (m, x) in enumerate(zip(feature_mask, inputs)))


def _format_one_mask(mask: Tensor, x: Tensor, index: int) -> Tensor:
    if mask.is_complex():
        raise CaptumArgumentTypeError(f"feature_mask[{index}] must hold integer feature ids, got dtype "
                                      f"{mask.dtype}")
    if mask.is_floating_point():
        if not bool((torch.isfinite(mask) & (mask == mask.round())).all()):
            raise CaptumArgumentTypeError(f"feature_mask[{index}] must hold integer feature ids, got "
                                          f"non-integer values in a {mask.dtype} mask; pass mask.long() "
                                          "of the ids you mean")
    if mask.dim() > x.dim():
        raise CaptumArgumentRuntimeError(f"feature_mask[{index}] of shape {tuple(mask.shape)} has more "
                                         f"dimensions than its input of shape {tuple(x.shape)}")
    mask = mask.reshape((1,) * (x.dim() - mask.dim()) + tuple(mask.shape))
    if any(m != 1 and m != d for m, d in zip(mask.shape, x.shape)):
        raise CaptumArgumentRuntimeError(
            f"feature_mask[{index}] of shape {tuple(mask.shape)} does not broadcast to its input of shape "
            f"{tuple(x.shape)}: every mask dimension must be 1 or the input's (a (1, 1, H, W) mask for "
            "all examples and channels, (N, 1, H, W) per example, (1, C, H, W) per channel)")
    return mask.to(device=x.device, dtype=torch.int64)


def _feature_tensors(masks: tuple[Tensor, ...]) -> dict[int, list[int]]:
    """Every feature id and the inputs it occurs in, in Captum's order: the ids of the first
    mask ascending, then the new ids of the next mask, and so on."""
    tensors: dict[int, list[int]] = {}
    for i, mask in enumerate(masks):
        for feature in torch.unique(mask).tolist():
            tensors.setdefault(int(feature), []).append(i)
    return tensors


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
    raise CaptumArgumentTypeError(f"forward_func must return a tensor, int or float, got "
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
            raise CaptumArgumentError(f"target {target!r} indexes {len(index)} output dimension(s) but the "
                                         f"output has shape {tuple(output.shape)}; give one index per "
                                         "dimension after the batch")
        try:
            return output[(slice(None), *index)]
        except IndexError as e:
            raise CaptumArgumentIndexError(f"target {target!r} is out of range for output shape "
                                              f"{tuple(output.shape)}") from e
    num_examples = output.shape[0] if output.dim() else 0
    if isinstance(target, Tensor):
        if target.numel() == 1 and not target.is_floating_point() and not target.is_complex():
            return _select_targets(output, int(target.item()))
        if target.dim() == 1 and target.numel() == num_examples:
            return _gather_per_example(output, target.to(output.device))
        raise CaptumArgumentError(f"target tensor of shape {tuple(target.shape)} does not fit output shape "
                                     f"{tuple(output.shape)}: give one integer, or a 1-D tensor with one class "
                                     "per example")
    if isinstance(target, list):
        if len(target) != num_examples:
            raise CaptumArgumentError(f"target list has {len(target)} entries but the output has "
                                         f"{num_examples} examples: give one target per example")
        if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target):
            return _gather_per_example(output, torch.tensor([int(t) for t in target], device=output.device))
        if all(isinstance(t, tuple) for t in target):
            try:
                return torch.stack([output[(i, *t)] for i, t in enumerate(target)])
            except IndexError as e:
                raise CaptumArgumentIndexError(f"target {target!r} is out of range for output shape "
                                                  f"{tuple(output.shape)}") from e
        raise CaptumArgumentTypeError("a target list must hold ints (one class per example) or tuples (one "
                                         f"output index per example), got {[type(t).__name__ for t in target]}")
    raise CaptumArgumentTypeError(f"target must be None, an int, a tuple, a list or a tensor, got "
                                     f"{type(target).__name__}")


def _gather_per_example(output: Tensor, classes: Tensor) -> Tensor:
    if output.dim() != 2:
        raise CaptumArgumentError(f"a per-example target needs an output of shape (N, classes), got "
                                     f"{tuple(output.shape)}; use a single int or tuple target instead")
    # Captum's torch.gather fails on these with RuntimeError.
    if classes.is_floating_point() or classes.is_complex() or classes.dtype is torch.bool:
        raise CaptumArgumentRuntimeError(f"target tensor must hold integer class indices, got dtype "
                                            f"{classes.dtype}")
    classes = classes.long()
    if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= output.shape[1]):
        raise CaptumArgumentRuntimeError(f"target classes {classes.tolist()} are out of range: the output "
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


def _call_forward(forward_func: Callable, inputs: tuple[Tensor, ...], extra_args: Optional[tuple]):
    """What ``forward_func`` returns for the inputs and extra arguments (a function without
    parameters is called without them, as in Captum)."""
    if _takes_arguments(forward_func):
        return forward_func(*inputs, *(extra_args or ()))
    return forward_func()


def _run_forward(forward_func: Callable, inputs: tuple[Tensor, ...], target: Target,
                 extra_args: Optional[tuple]) -> Tensor:
    return _select_targets(_as_output_tensor(_call_forward(forward_func, inputs, extra_args)), target)


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
    if isinstance(target, list) and all(isinstance(t, tuple) and len(t) == 1 and isinstance(t[0], numbers.Integral)
                                        and not isinstance(t[0], bool) for t in target):
        return [int(t[0]) % classes for t in target]  # one index tuple per example, as Captum indexes
    return None


# --- Captum's class surface -------------------------------------------------------------------


def _wrapped_like_captum(method: Callable) -> Callable:
    """Captum decorates ``attribute`` with ``log_usage`` (a ``functools.wraps`` wrapper), and its
    subclasses call ``super().attribute.__wrapped__(self, ...)`` to skip it: keep that handle.
    Nothing is logged."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return method(*args, **kwargs)

    return wrapper


def _why_not_incremental(model, x: Tensor, target) -> Optional[str]:
    """Why the model and input cannot take the incremental path whatever the features are
    (None when they can): no target, training mode, dtype or device mismatch, non-finite input."""
    if target is None:
        return "no target: the attribution is per output entry"
    if any(m.training for m in model.modules()):
        return "the model is in training mode (call model.eval() for the incremental path)"
    param = next(model.parameters(), None)
    if param is not None and (param.dtype != x.dtype or param.device != x.device):
        return "the input's dtype or device differs from the model's"
    if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
        return "the input is not a finite floating-point tensor"
    return None


def _spaced_name(name: str) -> str:
    """A class name with a space before each capital but the first, as Captum's ``get_name``
    writes it (``"Feature Ablation"``; it titles the progress bar)."""
    return "".join(c if c.islower() or i == 0 else " " + c for i, c in enumerate(name))


class _PerturbationMethod:
    """What Captum's perturbation methods share: the constructor's check, ``use_weights``, the
    name, ``multiplies_by_inputs`` and no convergence delta; and the last call's record."""

    use_weights = False

    def __init__(self, forward_func: Callable[..., Any]) -> None:
        if not callable(forward_func):
            raise CaptumArgumentTypeError(f"forward_func must be callable (a model or function), got "
                                          f"{type(forward_func).__name__}")
        self.forward_func = forward_func
        self.last_path: Optional[str] = None
        self.last_fallback_reason: Optional[str] = None
        self.last_stats: dict = {}

    @classmethod
    def get_name(cls) -> str:
        """The class name with a space before each capital but the first, as Captum writes it
        (``"Feature Ablation"``; it titles the progress bar)."""
        return _spaced_name(cls.__name__)

    @property
    def multiplies_by_inputs(self) -> bool:
        """True, as for every Captum perturbation method."""
        return True

    def has_convergence_delta(self) -> bool:
        """False: a perturbation method has no convergence delta (as in Captum)."""
        return False


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
