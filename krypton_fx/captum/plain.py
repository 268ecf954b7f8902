"""The plain engine: Captum's occlusion algorithm, for whatever the incremental path cannot take."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .forms import (
    OcclusionArgumentError,
    _expand_forward_args,
    _expand_target,
    _run_forward,
    _shift_counts,
    _window_masks_1d,
)

__all__ = ["attribute_plain"]


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
