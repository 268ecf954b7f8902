"""Naive occlusion (eqs. 1-6): one full inference per patch position, batched.

The baseline krypton_fx is measured against, and its exactness oracle.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import common
from . import geometry as geo
from .common import IntOrTuple
from .ops import occlude_window
from .results import OcclusionResult, RunStats
from .targets import SegmentationTarget, reduce_dense, select_output
from .tracing import eval_mode

__all__ = ["naive_occlusion"]


@torch.no_grad()
def naive_occlusion(model: nn.Module, image: Tensor, patch: IntOrTuple = 16, stride: IntOrTuple = 4,
                    color: Union[float, Sequence[float]] = 0.0, label: Optional[int] = None,
                    batch_size: Optional[int] = None, output: str = "prob",
                    progress: bool = False, spatial_dims: Optional[int] = None,
                    target: Optional[SegmentationTarget] = None, mask: Optional[Tensor] = None) -> OcclusionResult:
    """Naive occlusion: one full inference per patch position, batched (eqs. 1-6).

    The baseline krypton_fx is measured against, and its exactness oracle.

    Args:
        spatial_dims: spatial axes of ``image`` (1, 2 or 3). By default the
            length of a tuple ``patch`` or ``stride``, else 3 for a 5-D image
            and 2 otherwise: give it for a volume without its batch axis
            ``(C, D, H, W)`` or a signal ``(C, L)``.
        target: a dense output's :class:`krypton_fx.SegmentationTarget` (as compiled), reduced
            over the whole output of every occluded image; ``mask`` replaces its mask.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> res = naive_occlusion(model, torch.rand(3, 64, 64), patch=16, stride=16)
        >>> tuple(res.heatmap.shape)
        (4, 4)
    """
    start = time.perf_counter()
    output = common.output_kind(output)
    batch_size = common.batch_size(batch_size)
    dtype = common.model_dtype(model)
    nd = spatial_dims or _axes_of(patch, stride, image)
    image = common.image_batch(image, dtype=dtype, spatial_dims=nd)
    patch_t, stride_t = common.int_tuple(patch, nd, "patch"), common.int_tuple(stride, nd, "stride")
    size = tuple(image.shape[2:])
    if any(p > n for p, n in zip(patch_t, size)):
        raise ValueError(f"patch {patch_t} is larger than the image {size}; use a smaller patch")
    *starts, grid = geo.occlusion_grid(size, patch_t, stride_t)
    device = common.resolve_device(None, model)
    image = image.to(device)
    col = common.color_values(color, image.shape[1], image.dtype).to(device)
    with eval_mode(model):
        logits = model(image.clone())  # a model that edits its input in place must not edit ours
        if target is not None:
            resolved = target.resolve(select_output(logits, target.key), mask)
            label, base, output = target.category, resolved.base[0], target.output
            maps, totals = resolved.inputs
            score = lambda out: reduce_dense(select_output(out, target.key), maps, totals, label, output)[:, 0]  # noqa: E731
        else:
            label = common.label_index(label, logits.shape[-1])
            label = int(logits.argmax(1)) if label is None else label
            base = float(common.scores(logits, label, output))
            score = lambda out: common.scores(out, label, output)  # noqa: E731
        count = len(starts[0])
        batch = min(batch_size or common.default_batch_size(device, 4 * image[0].numel() * 8), count)
        out = torch.empty(count, dtype=torch.float32)
        # The whole image is the window, the patch sits at the position's start.
        table = torch.stack([torch.zeros_like(s) for s in starts] + starts, 1).to(device)
        for lo in common.progress(range(0, count, batch), progress, "naive occlusion"):
            occluded = occlude_window(image, col, table[lo:lo + batch], size, patch_t, backend="torch")
            out[lo:lo + batch] = score(model(occluded.contiguous())).cpu()
    return OcclusionResult(out.view(grid), label, base, stride_t, patch_t, output,
                           RunStats(count, batch, seconds=time.perf_counter() - start),
                           mask=resolved.mask if target is not None else None)


def _axes_of(patch, stride, image) -> int:
    """Spatial axes of a naive run: a tuple patch/stride says; else 3 for a 5-D image, else 2."""
    for value in (patch, stride):
        if isinstance(value, Sequence) and not isinstance(value, str):
            return len(value)
    return 3 if isinstance(image, Tensor) and image.dim() == 5 else 2
