"""The plain engines: Captum's occlusion and feature-ablation algorithms, for whatever the
incremental paths cannot take."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor

from .forms import (
    CaptumArgumentError,
    CaptumArgumentRuntimeError,
    OcclusionArgumentError,
    Target,
    _as_output_tensor,
    _call_forward,
    _expand_forward_args,
    _expand_target,
    _run_forward,
    _select_targets,
    _shift_counts,
    _window_masks_1d,
)

__all__ = ["attribute_plain", "AblationCall", "ablate_plain", "ablate_plain_future"]

logger = logging.getLogger(__name__)


def attribute_plain(forward_func: Callable, inputs: tuple[Tensor, ...], windows, strides, baselines, target,
                     extra_args: Optional[tuple], ppe: int, bar, stats: dict) -> tuple[Tensor, ...]:
    """Captum's algorithm: windows of all inputs in one sequence, ``ppe`` per forward call."""
    counts = [_shift_counts(x.shape[1:], w, s) for x, w, s in zip(inputs, windows, strides)]
    features = [math.prod(sc) for sc in counts]
    first_feature = [sum(features[:i]) for i in range(len(inputs))]
    total_features = sum(features)
    examples = inputs[0].shape[0]

    initial = _run_forward(forward_func, inputs, target, extra_args)
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
            mask = _window_masks(local, features[i], x.shape[1:], windows[i], strides[i],
                                      counts[i]).unsqueeze(1)  # (k, 1, *dims)
            masks[i] = mask
            baseline = baselines[i]
            if isinstance(baseline, Tensor):
                baseline = baseline.reshape((1, *baseline.shape))
            # The same arithmetic as Captum (not a where), so NaN/inf propagate alike.
            blended = (x.reshape((k, -1, *x.shape[1:])) * (1 - mask).to(x.dtype)
                       + baseline * mask.to(x.dtype))
            ablated[i] = blended.reshape(x.shape)
        modified = _run_forward(forward_func, tuple(ablated), _expand_target(target, k),
                                _expand_forward_args(extra_args, k))
        if not shape_checked:
            _check_output_grows(inputs, initial, modified, k)
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
        for size, w, s, cnt in zip(x.shape[1:], window, stride, sc):
            per_dim = _window_masks_1d(cnt, size, w, s, x.device).sum(0).float()
            weight = weight.unsqueeze(-1) * per_dim
        result.append(total.float() / weight)
    stats.update(positions=total_features, incremental_positions=0,
                           plain_forwards=total_features * examples)
    return tuple(result)

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

def _check_output_grows(inputs, initial: Tensor, modified: Tensor, copies: int) -> None:
    """With several windows per call the output must grow with the batch (no aggregation)."""
    expected = copies * initial.shape[0] if initial.dim() else None
    if expected is None or modified.dim() == 0 or modified.shape[0] != expected:
        raise OcclusionArgumentError(
            f"forward_func returned shape {tuple(modified.shape)} for {copies} stacked copies of a "
            f"batch whose output has shape {tuple(initial.shape)}: with perturbations_per_eval > 1 "
            "its output must grow with the batch; use perturbations_per_eval=1 for an aggregating "
            "forward_func")


# --- feature ablation ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AblationCall:
    """One ``FeatureAblation.attribute`` call, its arguments in Captum's normalised forms."""

    forward_func: Callable
    inputs: tuple[Tensor, ...]           # one tensor per forward argument, examples along dim 0
    masks: tuple[Tensor, ...]            # per input: int64 feature ids, the input's dims (1 or its size)
    baselines: tuple                     # per input: a number, or a tensor with a leading 1 added
    target: Target
    extra_args: Optional[tuple]          # additional_forward_args as a tuple, or None
    ppe: int                             # perturbations_per_eval
    features: dict[int, list[int]]       # feature id -> the inputs it occurs in, Captum's order


@dataclasses.dataclass(frozen=True)
class _AblatedBatch:
    """The inputs of one forward call: ``len(ids)`` copies of the batch, copy ``j`` with
    feature ``ids[j]`` ablated."""

    ids: list[int]
    inputs: tuple[Tensor, ...]
    target: Target
    extra_args: Optional[tuple]
    masks: dict[int, Tensor]             # per input holding one of ids: _feature_masks of it


def _evaluate(forward_func: Callable, inputs, target: Target, extra_args) -> Tensor:
    output = _call_forward(forward_func, inputs, extra_args)
    if isinstance(output, torch.futures.Future):
        raise CaptumArgumentError("forward_func returned a torch.futures.Future: call attribute_future "
                                  "for a forward_func that returns futures")
    return _select_targets(_as_output_tensor(output), target)


def _evaluate_future(forward_func: Callable, inputs, target: Target, extra_args) -> torch.futures.Future:
    output = _call_forward(forward_func, inputs, extra_args)
    if not isinstance(output, torch.futures.Future):
        raise CaptumArgumentError(f"attribute_future needs a forward_func that returns a "
                                  f"torch.futures.Future, got {type(output).__name__}: call attribute "
                                  "instead")
    return output.then(lambda done: _select_targets(_as_output_tensor(done.value()), target))


def _feature_masks(call: AblationCall, ids: list[int], i: int) -> Tensor:
    """``(len(ids), *mask.shape)`` int64: where each feature of ``ids`` lies in input ``i``."""
    return torch.stack([(call.masks[i] == f).long() for f in ids])


def _ablated_batches(call: AblationCall) -> Iterator[_AblatedBatch]:
    """Captum's forward calls: the features in order, ``ppe`` per call, each ablated in its own
    copy of the batch (``x * (1 - m) + baseline * m``: the same arithmetic as Captum, so NaN,
    inf and dtype promotion come out alike)."""
    ids_all = list(call.features)
    examples = call.inputs[0].shape[0]
    ppe = call.ppe
    repeated = tuple(torch.cat([x] * ppe, dim=0) if ppe > 1 else x for x in call.inputs)
    for lo in range(0, len(ids_all), ppe):
        ids = ids_all[lo:lo + ppe]
        k = len(ids)
        involved = sorted({i for f in ids for i in call.features[f]})
        if all(call.inputs[i].numel() == 0 for i in involved):
            logger.info("FeatureAblation: features %s lie only in empty inputs: skipped", ids)
            continue
        if k == ppe:
            copies, target, extra = repeated, _expand_target(call.target, k), _expand_forward_args(call.extra_args, k)
        else:
            # Captum cuts every input at k * (examples of the first input) rows.
            copies = tuple(x[:k * examples] for x in repeated)
            target, extra = _expand_target(call.target, k), _expand_forward_args(call.extra_args, k)
        ablated, masks_of = list(copies), {}
        for i in involved:
            x = copies[i]
            masks = masks_of[i] = _feature_masks(call, ids, i)
            rows = x.shape[0] // k
            out = x.clone()
            for j in range(k):
                mask = masks[j]
                part = x[j * rows:(j + 1) * rows]
                blended = part * (1 - mask).to(x.dtype) + call.baselines[i] * mask.to(x.dtype)
                out = out.to(blended.dtype)
                out[j * rows:(j + 1) * rows] = blended
            ablated[i] = out
        yield _AblatedBatch(ids, tuple(ablated), target, extra, masks_of)


class _Totals:
    """Captum's running sums: per input, the output drop of every ablated feature spread over the
    feature's elements (and with ``use_weights`` the number of ablations of each element)."""

    def __init__(self, call: AblationCall, initial: Tensor, use_weights: bool):
        self.call, self.use_weights = call, use_weights
        self.initial = initial
        self.n_outputs = initial.numel()
        self.flat_initial = initial.reshape(1, -1)
        self.totals = [torch.zeros((self.n_outputs, *x.shape[1:]), dtype=self.flat_initial.dtype, device=x.device)
                       for x in call.inputs]
        self.weights = ([torch.zeros((self.n_outputs, *x.shape[1:]), device=x.device) for x in call.inputs]
                        if use_weights else [])
        self.checked = call.ppe == 1
        for i, (x, mask) in enumerate(zip(call.inputs, call.masks)):
            if mask.dim() and mask.shape[0] > 1 and x.numel() and mask.shape[0] != self.n_outputs:
                # Captum fails adding the drops up (RuntimeError): say why
                raise CaptumArgumentRuntimeError(
                    f"feature_mask[{i}] has one mask per example ({mask.shape[0]}) but the target selects "
                    f"{self.n_outputs} output value(s) per call: per-example masks need one output per "
                    "example (a target per example, or a forward_func returning one value per example)")

    def add(self, ids: list[int], modified: Tensor, masks_of: Optional[dict[int, Tensor]] = None) -> None:
        """Adds one forward call's drops (``masks_of`` as the batch had them, or made again)."""
        if not self.checked:  # Captum checks the first call: the output must grow with the batch
            _check_output_grows(self.call.inputs, self.initial, modified, len(ids))
            self.checked = True
        drop = self.flat_initial - modified.reshape(-1, self.n_outputs)  # (k, n_outputs)
        involved = {i for f in ids for i in self.call.features[f]}
        for i in sorted(involved):
            masks = masks_of[i] if masks_of is not None else _feature_masks(self.call, ids, i)
            if self.use_weights:
                self.weights[i] += masks.float().sum(dim=0)
            x = self.call.inputs[i]
            if x.numel() == 0:
                continue
            spread = drop.reshape(drop.shape + (1,) * (x.dim() - 1)).to(self.totals[i].device)
            self.totals[i] += (spread * masks.to(self.totals[i].dtype)).sum(dim=0)

    def result(self) -> tuple[Tensor, ...]:
        if self.use_weights:
            return tuple(total.float() / weight for total, weight in zip(self.totals, self.weights))
        return tuple(self.totals)


def ablate_plain(call: AblationCall, use_weights: bool, bar) -> tuple[Tensor, ...]:
    """Captum's FeatureAblation: one unablated forward, then ``ppe`` features per forward call."""
    initial = _evaluate(call.forward_func, call.inputs, call.target, call.extra_args)
    bar.update(1)
    totals = _Totals(call, initial, use_weights)
    for batch in _ablated_batches(call):
        modified = _evaluate(call.forward_func, batch.inputs, batch.target, batch.extra_args)
        bar.update(1)
        totals.add(batch.ids, modified, batch.masks)
    return totals.result()


def ablate_plain_future(call: AblationCall, use_weights: bool, bar,
                        finish: Callable[[tuple[Tensor, ...]], Union[Tensor, tuple]]) -> torch.futures.Future:
    """:func:`ablate_plain` for a ``forward_func`` returning futures: every forward is started
    at once, and the result (``finish`` of the attributions) is a future that completes when
    they all have."""
    initial = _evaluate_future(call.forward_func, call.inputs, call.target, call.extra_args)
    bar.update(1)
    started = []  # (feature ids, future): the masks are made again when the results are in
    for batch in _ablated_batches(call):
        started.append((batch.ids, _evaluate_future(call.forward_func, batch.inputs, batch.target,
                                                    batch.extra_args)))
        bar.update(1)
    bar.close()

    def accumulate(_) -> Union[Tensor, tuple]:
        totals = _Totals(call, initial.value(), use_weights)
        for ids, modified in started:
            totals.add(ids, modified.value())
        return finish(totals.result())

    return torch.futures.collect_all([initial, *(f for _, f in started)]).then(accumulate)
