"""A drop-in for ``captum.attr.FeatureAblation``, with a seam for incremental inference.

``FeatureAblation(model).attribute(...)`` takes Captum's arguments and returns
Captum's result: for every input element, the drop of the output (the target)
when the element's feature (all elements with its id in ``feature_mask``) is
replaced by the baseline. Features are ablated in Captum's order (the ids of
the first input's mask ascending, then the new ids of the next input's mask),
``perturbations_per_eval`` of them per forward call, each in its own copy of
the batch.

When the explained function is an ``nn.Module``, the input is one
``(N, C, *spatial)`` image batch and the features are spatial segments (a mask
of shape ``(1 or N, 1 or C, *spatial)``: superpixels, organs, per image or per
channel), the per-segment outputs come from the engine's incremental segment ablation
(:meth:`krypton_fx.Explainer.ablate`, through :func:`_incremental_segments`, the one
seam); for everything else (tabular inputs, several
inputs, untraceable forwards, channel groups, ``use_weights``), a plain
implementation of Captum's semantics runs. ``FeatureAblation.last_path`` says
which one ran.

What a caller of Captum's class can observe is kept: the signatures of
``attribute`` and ``attribute_future`` (with ``__wrapped__``), ``get_name()``,
``has_convergence_delta()``, ``multiplies_by_inputs``, ``forward_func``,
``use_weights``; the result's type, shape and dtype (the output's dtype, float32
with ``use_weights``); Captum's progress bar (``"Feature Ablation attribution"``).
A bad argument raises :class:`~krypton_fx.captum.forms.CaptumArgumentError`, a
``ValueError`` that says what to fix and an ``AssertionError`` as in Captum (and
Captum's ``IndexError``, ``RuntimeError`` or ``TypeError`` where it raises one of
those). Deliberate differences: a mask with fewer dimensions than its input
gets leading ones (Captum mixes features across copies for
``perturbations_per_eval > 1`` there); more masks or baselines than inputs,
fewer masks, masks of non-integer ids, and baselines that only broadcast by
adding dimensions are refused (Captum ignores them or returns garbage); a
non-callable ``forward_func`` is refused at once; the output-shape check for
``perturbations_per_eval > 1`` runs on every call (Captum: once per object).

Captum itself is not imported: it is only needed to compare against.

Example:
    >>> import torch
    >>> from krypton_fx.captum import FeatureAblation
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 5)).eval()
    >>> mask = (torch.arange(64).view(1, 1, 8, 8) // 16)  # 4 horizontal bands
    >>> attr = FeatureAblation(net).attribute(torch.rand(2, 3, 8, 8), target=[1, 3], feature_mask=mask)
    >>> tuple(attr.shape)
    (2, 3, 8, 8)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..explainer import compile as compile_explainer
from .forms import (
    Baseline,
    CaptumArgumentError,
    Target,
    _as_output_tensor,
    _feature_tensors,
    _format_baselines,
    _format_feature_masks,
    _format_inputs,
    _per_example_classes,
    _PerturbationMethod,
    _progress_bar,
    _select_targets,
    _why_not_incremental,
    _WindowProgress,
    _wrapped_like_captum,
)
from .plain import AblationCall, ablate_plain, ablate_plain_future

__all__ = ["FeatureAblation"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _SegmentPlan:
    """Everything the incremental path needs for one call."""

    segments: list[Tensor]               # per example: (1 or C, *spatial) int64 segment ids
    baselines: list[Union[float, Tensor]]  # per example: a number or a (C, *spatial) image
    classes: list[int]                   # per example: the class the target selects
    base: Tensor                         # (N,): the unablated output for the target (output dtype)


def _incremental_segments(model: nn.Module, images: Tensor, segments: list[Tensor],
                          baselines: list[Union[float, Tensor]], classes: list[int],
                          batch_size: int) -> Union[list[Tensor], str]:
    """The engine's per-segment outputs, or why there are none (then the plain path runs).

    The one place the drop-in talks to the engine's segment ablation
    (:meth:`Explainer.ablate`; docs/design.md, "Perturbations and targets")::

        ex = krypton_fx.compile(model, patch=1, stride=spatial, image_size=spatial, channels=C,
                                output="logit", device=...)
        scores = ex.ablate(image, segments, baseline=baseline, label=label, batch_size=batch_size).scores

    (patch 1 at one position: the explainer's own grid is the cheapest there is, and
    ``ablate`` does not use it; any image size compiles.)

    - ``image``: ``(C, *spatial)``, the model's dtype and device;
    - ``segments``: ``(1 or C, *spatial)`` int64 ids, any integers, not necessarily
      consecutive; a segment may be in several pieces; ``C`` rows: per-channel masks;
    - ``baseline``: a float, or a ``(C, *spatial)`` tensor (the model's dtype and device);
    - ``label``: the class whose logit is recorded; ``batch_size``: at most this many
      ablated images per batch (Captum's ``perturbations_per_eval * N`` bound);
    - ``scores``: ``(S,)`` float32 on the CPU, ``S`` the distinct ids of ``segments`` in
      ascending order (``torch.unique``): ``model(x')[label]`` with ``x' = where(segments ==
      id, baseline, image)`` (broadcast over channels for a one-row mask), exact up to float
      rounding.

    A model that does not compile, or whose traced graph does not reproduce it (checked on
    the first image), goes plain.

    Args:
        model: the ``nn.Module`` being explained (eval mode, traceable as far as known).
        images: ``(N, C, *spatial)`` finite floating-point images.
        segments: per example, its ``(1 or C, *spatial)`` int64 mask.
        baselines: per example, a finite float or a ``(C, *spatial)`` tensor.
        classes: per example, the class whose logit is recorded.
        batch_size: the most ablated images per batch.

    Returns:
        Per example, the ``(S_k,)`` outputs of its segments (ascending ids), or a reason.
    """
    n, c, *dims = images.shape
    try:
        ex = compile_explainer(model, patch=1, stride=tuple(dims), image_size=tuple(dims), channels=c,
                               output="logit", device=images.device)
        return [ex.ablate(images[k], segments[k], baseline=baselines[k], label=classes[k],
                          batch_size=batch_size).scores for k in range(n)]
    except (ValueError, TypeError) as e:  # TraceError, a graph that differs from the model: go plain
        return f"the model does not compile for incremental ablation: {type(e).__name__}: {e}"


class FeatureAblation(_PerturbationMethod):
    """Feature-ablation attributions, the same as ``captum.attr.FeatureAblation``.

    Args:
        forward_func: the model or function to explain (returning a tensor, a
            number, or for :meth:`attribute_future` a ``torch.futures.Future``).

    As Captum's: :meth:`attribute` and :meth:`attribute_future` (with ``__wrapped__``),
    ``get_name()``, ``has_convergence_delta()`` (False), ``multiplies_by_inputs`` (True),
    and the attributes ``forward_func`` and ``use_weights``.

    Attributes:
        forward_func: the explained callable; it may be replaced between calls.
        use_weights: False, as in Captum; True divides each attribution by the
            number of times its element was ablated (float32 results).
        last_path: ``"incremental"`` or ``"plain"``: how the last call was computed.
        last_fallback_reason: why the last call could not go incremental (None when it did).
        last_stats: counts of the last call: ``features`` (distinct ids),
            ``plain_forwards`` (model calls on ablated batches), ``incremental_segments``.

    Example:
        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(6, 3))
        >>> mask = torch.tensor([[0, 0, 1, 1, 2, 2]])
        >>> attr = FeatureAblation(mlp).attribute(torch.rand(4, 6), target=0, feature_mask=mask)
        >>> tuple(attr.shape)
        (4, 6)
    """

    @_wrapped_like_captum
    def attribute(self, inputs: Union[Tensor, tuple[Tensor, ...]], baselines: Baseline = None,
                  target: Target = None, additional_forward_args: Optional[object] = None,
                  feature_mask: Union[None, Tensor, tuple[Tensor, ...]] = None,
                  perturbations_per_eval: int = 1, show_progress: bool = False,
                  **kwargs: Any) -> Union[Tensor, tuple[Tensor, ...]]:
        """Attribution of every input element: the output drop when its feature is ablated.

        Arguments and result are those of ``captum.attr.FeatureAblation.attribute``.

        Args:
            inputs: a tensor, or a tuple of tensors (one per forward argument),
                with the examples along dimension 0.
            baselines: the value an ablated element takes: a number, a tensor
                broadcastable to the input, or one of those per input; None means 0.
            target: the output to explain: an int or tuple for every example, or
                a list / 1-D tensor with one per example; None for a scalar per
                example (or per batch).
            additional_forward_args: extra forward arguments after the inputs;
                tensors are repeated along dimension 0 with the inputs.
            feature_mask: integer feature ids per input, broadcastable to it
                (``(1 or N, 1 or C, *spatial)`` for images: shared or per example,
                per channel or not); None makes every element its own feature.
            perturbations_per_eval: features ablated in one forward call (each call
                holds ``perturbations_per_eval * N`` examples).
            show_progress: show Captum's progress bar on stderr.
            **kwargs: ignored, as Captum's FeatureAblation ignores them (logged).

        Returns:
            Attributions shaped like ``inputs`` (a tuple when ``inputs`` is a tuple),
            in the output's dtype; dimension 0 is the number of selected outputs
            (``N`` for one target per example, 1 for one scalar per batch).

        Raises:
            CaptumArgumentError: a bad argument (a ``ValueError`` and an ``AssertionError``,
                and whatever else Captum raises for it).

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
            >>> mask = torch.arange(16).view(1, 1, 4, 4) // 8
            >>> attr = FeatureAblation(net).attribute(torch.rand(1, 1, 4, 4), target=1, feature_mask=mask)
            >>> bool((attr[0, 0, :2] == attr[0, 0, 0, 0]).all())
            True
        """
        call, is_tuple = self._normalise(inputs, baselines, target, additional_forward_args, feature_mask,
                                         perturbations_per_eval, kwargs)
        bar = _progress_bar(show_progress, f"{self.get_name()} attribution",
                            math.ceil(len(call.features) / call.ppe))
        try:
            with torch.no_grad():
                plan = self._incremental_plan(call)
                scores = (_incremental_segments(self.forward_func, call.inputs[0], plan.segments, plan.baselines,
                                                plan.classes, call.ppe * call.inputs[0].shape[0])
                          if isinstance(plan, _SegmentPlan) else plan)
                if isinstance(scores, list):
                    attributions = self._paint(call, plan, scores, bar)
                    self.last_path, self.last_fallback_reason = "incremental", None
                else:
                    logger.debug("FeatureAblation: plain path: %s", scores)
                    attributions = ablate_plain(call, self.use_weights, bar)
                    self.last_stats.update(plain_forwards=math.ceil(len(call.features) / call.ppe))
                    self.last_path, self.last_fallback_reason = "plain", scores
        finally:
            bar.close()
        return attributions if is_tuple else attributions[0]

    @_wrapped_like_captum
    def attribute_future(self, inputs: Union[Tensor, tuple[Tensor, ...]], baselines: Baseline = None,
                         target: Target = None, additional_forward_args: Optional[object] = None,
                         feature_mask: Union[None, Tensor, tuple[Tensor, ...]] = None,
                         perturbations_per_eval: int = 1, show_progress: bool = False,
                         **kwargs: Any) -> torch.futures.Future:
        """:meth:`attribute` for a ``forward_func`` that returns ``torch.futures.Future``: all
        forward calls are started at once and a future of the attributions is returned.

        Example:
            >>> import torch
            >>> def forward(x):
            ...     done = torch.futures.Future()
            ...     done.set_result(x.sum(1))
            ...     return done
            >>> FeatureAblation(forward).attribute_future(torch.ones(2, 3)).wait()
            tensor([[1., 1., 1.],
                    [1., 1., 1.]])
        """
        call, is_tuple = self._normalise(inputs, baselines, target, additional_forward_args, feature_mask,
                                         perturbations_per_eval, kwargs)
        bar = _progress_bar(show_progress, f"{self.get_name()} attribution",
                            math.ceil(len(call.features) / call.ppe))
        self.last_path, self.last_fallback_reason = "plain", "attribute_future runs the plain path"
        self.last_stats.update(plain_forwards=math.ceil(len(call.features) / call.ppe))
        with torch.no_grad():
            try:
                return ablate_plain_future(call, self.use_weights, bar,
                                           lambda result: result if is_tuple else result[0])
            finally:
                bar.close()

    # --- arguments ---------------------------------------------------------------------------

    def _normalise(self, inputs, baselines, target, additional_forward_args, feature_mask,
                   perturbations_per_eval, kwargs: dict) -> tuple[AblationCall, bool]:
        """The call in Captum's normalised forms, checked; and whether inputs came as a tuple."""
        formatted, is_tuple = _format_inputs(inputs)
        base_values = _format_baselines(baselines, formatted)
        if additional_forward_args is not None and not isinstance(additional_forward_args, tuple):
            additional_forward_args = (additional_forward_args,)
        masks = _format_feature_masks(feature_mask, formatted)
        # Captum asserts an int >= 1 (True passes as 1).
        if not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1:
            raise CaptumArgumentError(f"perturbations_per_eval must be an int >= 1, got "
                                      f"{perturbations_per_eval!r}")
        if kwargs:
            logger.warning("FeatureAblation.attribute ignores the keyword arguments %s, as Captum's does",
                           sorted(kwargs))
        reshaped = tuple(b.reshape((1, *b.shape)) if isinstance(b, Tensor) else b for b in base_values)
        self.last_stats = {"features": 0, "plain_forwards": 0, "incremental_segments": 0}
        call = AblationCall(self.forward_func, formatted, masks, reshaped, target, additional_forward_args,
                            int(perturbations_per_eval), _feature_tensors(masks))
        self.last_stats["features"] = len(call.features)
        return call, is_tuple

    # --- incremental path ---------------------------------------------------------------------

    def _incremental_plan(self, call: AblationCall) -> Union[_SegmentPlan, str]:
        """What the incremental path needs (segments, baselines, classes, unablated outputs),
        or why it does not apply."""
        model = self.forward_func
        if not isinstance(model, nn.Module):
            return "forward_func is not an nn.Module"
        if len(call.inputs) != 1:
            return "there is more than one input tensor"
        if call.extra_args is not None:
            return "additional_forward_args are given"
        if self.use_weights:
            return "use_weights is set"
        x, mask = call.inputs[0], call.masks[0]
        if x.dim() not in (3, 4, 5) or x.numel() == 0:
            return ("the input is not a non-empty (N, C, *spatial) batch with 1 to 3 spatial axes "
                    f"(shape {tuple(x.shape)})")
        n, c, *dims = x.shape
        if all(m == 1 for m in mask.shape[2:]) and math.prod(dims) > 1:
            return "the features are not spatial segments (the mask is constant over space)"
        reason = _why_not_incremental(model, x, call.target)
        if reason is not None:
            return reason
        baselines = _segment_baselines(call.baselines[0], x)
        if isinstance(baselines, str):
            return baselines
        initial = model(x)
        if isinstance(initial, torch.futures.Future):
            return "the model returns a future"
        initial = _as_output_tensor(initial)
        selected = _select_targets(initial, call.target)  # raises on a bad target, as the plain path would
        if initial.dim() != 2 or initial.shape[0] != n:
            return "the model does not return one row of class scores per example"
        classes = _per_example_classes(call.target, n, initial.shape[1])
        if classes is None:
            return "the target does not pick one class per example"
        full = (mask.shape[1], *dims)
        segments = [mask[min(k, mask.shape[0] - 1)].expand(full).contiguous() for k in range(n)]
        return _SegmentPlan(segments, baselines, classes, selected.reshape(n))

    def _paint(self, call: AblationCall, plan: _SegmentPlan, scores: list[Tensor], bar) -> tuple[Tensor, ...]:
        """Each element's attribution: the drop of its segment (as Captum sums them: one
        feature per element, so the drop itself), in the output's dtype."""
        x = call.inputs[0]
        n, c = x.shape[:2]
        bar.update(1)  # the unablated forward, run by the plan
        forwards = math.ceil(len(call.features) / call.ppe)
        progress = _WindowProgress(bar, forwards, n * len(call.features))
        out = torch.empty(x.shape, dtype=plan.base.dtype, device=x.device)
        for k in range(n):
            ids = torch.unique(plan.segments[k])
            if scores[k].shape != ids.shape:
                raise RuntimeError(f"the engine returned {tuple(scores[k].shape)} scores for example {k}, "
                                   f"which has {len(ids)} segments")
            drop = plan.base[k] - scores[k].to(device=x.device, dtype=plan.base.dtype)
            painted = drop[torch.searchsorted(ids, plan.segments[k])]
            out[k] = painted.expand(x.shape[1:])
            progress.advance(len(call.features))
        self.last_stats.update(incremental_segments=sum(len(s) for s in scores))
        return (out,)


def _segment_baselines(baseline, x: Tensor) -> Union[list[Union[float, Tensor]], str]:
    """Per example: the baseline as the engine takes it (a number, or a ``(C, *spatial)``
    image), or why it cannot."""
    n = x.shape[0]
    if not isinstance(baseline, Tensor):
        value = float(baseline)
        return [value] * n if math.isfinite(value) else "the baseline is not finite"
    if not bool(torch.isfinite(baseline).all()):
        return "the baseline is not finite"
    # Captum's leading 1 on the baseline, broadcast against (1, N, C, *spatial)
    full = torch.broadcast_to(baseline, (1, *x.shape))[0].to(x.dtype)
    return [full[k].contiguous() for k in range(n)]
