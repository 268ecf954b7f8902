"""A drop-in for ``captum.attr.Occlusion`` backed by incremental inference.

``Occlusion(model).attribute(...)`` takes Captum's arguments and returns
Captum's result: for every input element, the difference between the
unoccluded and the occluded output for the target, averaged over the sliding
windows that cover the element. Window positions follow Captum: along each
dimension of size ``D`` with window ``w`` and stride ``s`` there are
``ceil((D - w) / s) + 1`` windows starting at ``0, s, 2s, ...``, so the last
one may be cut off at the border.

When the explained function is an ``nn.Module`` that traces (or a plain function that
traces once the modules it calls are registered: Captum's segmentation tutorial's
aggregation ``lambda x: (net(x)["out"] * mask).sum((2, 3))``, say), the input is one
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
import inspect
import itertools
import logging
import math
from collections import OrderedDict
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..explainer import Explainer
from ..explainer import compile as compile_explainer
from .forms import (
    Baseline,
    OcclusionArgumentError,
    OcclusionArgumentTypeError,
    Target,
    _as_output_tensor,
    _format_baselines,
    _format_inputs,
    _format_strides,
    _format_windows,
    _per_example_classes,
    _PerturbationMethod,
    _progress_bar,
    _select_targets,
    _shift_counts,
    _why_not_incremental,
    _WindowProgress,
    _wrapped_like_captum,
)
from .plain import attribute_plain

__all__ = ["Occlusion"]

logger = logging.getLogger(__name__)

# Compiled explainers kept per Occlusion object (one per image size, window,
# stride and patch colour); per-example tensor baselines compile one per colour.
_MAX_CACHED_EXPLAINERS = 16


def _balanced_chunks(positions: int, cap: int) -> int:
    """The one chunk size for ``positions`` split into as few chunks of at most ``cap`` as possible,
    all of that size but the last (short by less than the number of chunks).

    A CUDA-graph runner is captured per batch size: one size per call keeps one graph, and the
    last chunk, padded to it, wastes fewer positions than the number of chunks.
    """
    chunks = -(-positions // max(1, cap))
    return -(-positions // max(1, chunks))


class _ForwardModule(nn.Module):
    """A plain forward function as a module, with the modules it calls (found among its closure's
    and its globals' names) as submodules, so that torch.fx can trace through them."""

    def __init__(self, forward_func: Callable, modules: dict[str, nn.Module]):
        super().__init__()
        self.forward_func = forward_func
        for name, module in modules.items():
            self.add_module(name, module)
        self.training = False  # (its own flag only: the modules' modes stay the caller's)

    def forward(self, x: Tensor):
        return self.forward_func(x)


def _as_module(forward_func: Callable, x: Tensor) -> Union[nn.Module, str]:
    """``forward_func`` as an ``nn.Module`` to compile, or why it cannot be one: a module as it is;
    a plain function that aggregates the dense output of a module it calls by name (a
    segmentation net's map, seen on ``x``) as a :class:`_ForwardModule`; any other function
    runs plain, as Captum's."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    try:
        refs = inspect.getclosurevars(forward_func)
    except TypeError:
        return "forward_func is not an nn.Module (nor a Python function)"
    modules = {name: v for name, v in {**refs.globals, **refs.nonlocals}.items() if isinstance(v, nn.Module)}
    dense = []

    def seen(module, args, out):
        out = out.get("out", next(iter(out.values()), None)) if isinstance(out, dict) else out
        dense.append(isinstance(out, Tensor) and out.dim() == x.dim() and out.shape[0] == x.shape[0])

    hooks = [m.register_forward_hook(seen) for m in modules.values()]
    try:
        forward_func(x)
    except Exception as e:  # noqa: BLE001 - the plain path raises it as Captum would
        return f"forward_func is not an nn.Module and fails on the input ({type(e).__name__})"
    finally:
        for h in hooks:
            h.remove()
    if not any(dense):
        return "forward_func is not an nn.Module (nor an aggregation of a segmentation net's dense output)"
    return _ForwardModule(forward_func, modules)


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


class Occlusion(_PerturbationMethod):
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

    use_weights = True

    def __init__(self, forward_func: Callable[..., Tensor]) -> None:
        super().__init__(forward_func)
        self._explainers: OrderedDict[tuple, Union[Explainer, str]] = OrderedDict()
        self._explainers_of: Optional[Callable] = forward_func  # the forward_func they were compiled from
        self._module: Union[nn.Module, str, None] = None  # forward_func as a module (_as_module), once

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
            self._explainers_of, self._module = self.forward_func, None

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
                    attributions = attribute_plain(self.forward_func, formatted, windows, stride_dims,
                                                   base_values, target, additional_forward_args,
                                                   perturbations_per_eval, bar, self.last_stats)
                    self.last_path, self.last_fallback_reason = "plain", plan
        finally:
            bar.close()
        return attributions if is_tuple else attributions[0]

    # --- incremental path ---------------------------------------------------------------------

    def _incremental_plan(self, inputs, windows, strides, baselines, target,
                          extra_args) -> Union[_IncrementalPlan, str]:
        """What the incremental path needs (explainers, classes, unoccluded outputs), or why it
        does not apply."""
        if len(inputs) != 1:
            return "there is more than one input tensor"
        if extra_args is not None:
            return "additional_forward_args are given"
        x = inputs[0]
        if x.dim() not in (3, 4, 5) or x.numel() == 0:
            return ("the input is not a non-empty (N, C, *spatial) batch with 1 to 3 spatial axes "
                    f"(shape {tuple(x.shape)})")
        if self._module is None:
            self._module = _as_module(self.forward_func, x)
        model = self._module
        if isinstance(model, str):
            return model
        n, c = x.shape[:2]
        if windows[0][0] != c:
            return "the window does not span all channels"
        if tuple(windows[0][1:]) == tuple(x.shape[2:]):
            return "the window covers the whole image: one position, nothing to reuse"
        reason = _why_not_incremental(model, x, target)
        if reason is not None:
            return reason
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
        corner = full[(slice(None), slice(None), *[slice(0, 1)] * (x.dim() - 2))]
        if not bool((full == corner).all()):
            return "the baseline varies inside the window"
        if not bool(torch.isfinite(corner).all()):
            return "the baseline is not finite"
        return [tuple(float(v) for v in corner[i].reshape(c).tolist()) for i in range(n)]

    def _explainer(self, x: Tensor, window, stride, color: tuple[float, ...]) -> Union[Explainer, str]:
        """The cached explainer for this image size, window, stride and colour (compiled once)."""
        key = (tuple(x.shape[1:]), tuple(window), tuple(stride), color, str(x.device))
        if key in self._explainers:
            self._explainers.move_to_end(key)
            return self._explainers[key]
        try:
            ex: Union[Explainer, str] = compile_explainer(
                self._module, patch=tuple(window), stride=tuple(stride), color=list(color),
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
        n, c, *dims = x.shape
        window, stride = tuple(plan.window), tuple(plan.stride)
        explainers, classes = plan.explainers, plan.classes

        # Captum's grid has one more row/column (slice) than the compiled one when the
        # last window is cut off at the border; those run as plain forwards.
        counts = _shift_counts(tuple(dims), window, stride)
        cells = math.prod(counts)
        grid = explainers[0].grid
        border = [cell for cell in itertools.product(*map(range, counts))
                  if any(i >= g for i, g in zip(cell, grid))]
        batch = ppe * n  # the images Captum puts in one forward call
        inner = explainers[0].positions
        # Every incremental batch of the call has the same size (at most Captum's), the last
        # one of each example padded by repeating its last position.
        chunk = _balanced_chunks(inner, batch)
        bar.update(1)  # the unoccluded forward, run by the plan
        progress = _WindowProgress(bar, math.ceil(cells / ppe), n * cells)

        occluded = torch.empty(n, *counts, dtype=torch.float64)
        inside = (slice(None), *(slice(0, g) for g in grid))
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
            occluded[k][inside[1:]] = scores.view(grid).double()
            color = torch.tensor(plan.colors[k], dtype=x.dtype, device=x.device).view(c, *(1,) * len(dims))
            for lo in range(0, len(border), batch):
                part_cells = border[lo:lo + batch]
                images = x[k].unsqueeze(0).repeat(len(part_cells), *(1,) * (len(dims) + 1))
                for b, cell in enumerate(part_cells):
                    region = tuple(slice(i * s, i * s + w) for i, s, w in zip(cell, stride, window))
                    images[(b, slice(None), *region)] = color  # slicing cuts at the border
                out = _as_output_tensor(model(images))[:, label].double().cpu()
                for b, cell in enumerate(part_cells):
                    occluded[(k, *cell)] = out[b]
                progress.advance(len(part_cells))

        drop = plan.base.view(n, *(1,) * len(dims)) - occluded
        # Sum over each element's covering windows: a transposed convolution of
        # the per-window drops with a window of ones, cropped to the input.
        transpose = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(dims)]
        ones = torch.ones(1, 1, *window, dtype=torch.float64)
        crop = (slice(None), slice(None), *(slice(0, d) for d in dims))
        totals = transpose(drop.unsqueeze(1), ones, stride=stride)[crop]
        covering = transpose(torch.ones(1, 1, *counts, dtype=torch.float64), ones, stride=stride)[crop]
        attribution = (totals / covering).float().expand(n, c, *dims).contiguous()
        self.last_stats.update(positions=cells, incremental_positions=inner * n,
                               plain_forwards=len(border) * n, batch_size=chunk)
        return (attribution.to(x.device),)
