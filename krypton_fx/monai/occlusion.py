"""``OcclusionSensitivity``: MONAI 1.6's class and answer, with a seam for fast engines.

A call runs in three steps:

1. :func:`~krypton_fx.monai.windows.window_grid` lists the windows and
   :func:`~krypton_fx.monai.rules.occlusion_rule` says what each window is
   occluded with (``region * mul + add``, or a callable);
2. :meth:`OcclusionSensitivity.window_outputs` infers every occluded image and
   returns the activated outputs, ``(n_windows, classes)``: the plain engine
   (:meth:`~OcclusionSensitivity.plain_outputs`, batches of ``n_batch`` as
   MONAI) or, once plugged in, the incremental one
   (:meth:`~OcclusionSensitivity.incremental_outputs`);
3. :func:`~krypton_fx.monai.windows.blend_windows` averages the outputs of the
   windows covering each voxel into MONAI's map; ``b_box`` crops it as MONAI.

``last_path`` and ``last_path_reason`` say which engine ran and why.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map
from monai.networks.utils import eval_mode
from monai.transforms import SpatialCrop
from monai.utils import ensure_tuple_rep
from torch import Tensor, nn
from tqdm import tqdm

from .. import common
from ..explainer import Explainer
from ..explainer import compile as compile_explainer
from ..passes.rewrite import PatchFill
from ..tracing import TraceError
from .rules import MODES, OcclusionRule, activate_outputs, gaussian_profile, occlusion_rule, plain_tensor
from .windows import WindowGrid, blend_windows, window_grid

__all__ = ["OcclusionSensitivity"]

logger = logging.getLogger(__name__)

# MONAI's sliding-window blend for gaussian mode: sigma = 0.125 * window size
_BLEND_SIGMA_SCALE = 0.125


class OcclusionSensitivity:
    """Occlusion sensitivity of a classifier, as ``monai.visualize.OcclusionSensitivity`` (MONAI 1.6).

    Same constructor, call, semantics and results as MONAI's class: a window
    of ``mask_size`` slides over the image (step ``int(mask * (1 - overlap))``,
    at least 1, the last window flush with the end of each axis); each window
    is occluded by ``mode``, the model infers the occluded image, and every
    voxel gets the mean of the activated outputs of the windows that cover it
    (Gaussian-weighted in gaussian mode).

    Args:
        nn_module: classification model; called in eval mode without
            gradients (MONAI's ``eval_mode``, which afterwards puts a model
            that was training back in ``train()``, all submodules included).
        mask_size: window size, one int for every axis or one per spatial axis.
        n_batch: occluded images per model call.
        verbose: show a tqdm progress bar.
        mode: ``"gaussian"`` (multiply by 1 - Gaussian), ``"mean_patch"``
            (MONAI 1.6.1 multiplies the window by its own mean),
            ``"mean_img"`` (the image mean), a float (that value), or a
            callable ``mode(x, region) -> occluded region``.
        overlap: overlap of neighbouring windows, in ``[0, 1)``; one float or one per axis.
        activate: ``True``: sigmoid when the *input* has one channel, else
            softmax over classes; ``False``: none; a callable: applied to
            each batch of outputs.

    Raises:
        NotImplementedError: ``mode`` is a string other than the three modes.

    Example:
        >>> import torch
        >>> from monai.networks.nets import DenseNet
        >>> from krypton_fx.monai import OcclusionSensitivity
        >>> model = DenseNet(spatial_dims=2, in_channels=1, out_channels=3, init_features=2,
        ...                  growth_rate=2, block_config=(2,))
        >>> occ = OcclusionSensitivity(model, mask_size=8, n_batch=8, verbose=False)
        >>> occ_map, most_probable = occ(torch.rand(1, 1, 24, 40), b_box=[4, 19, -1, -1])
        >>> tuple(occ_map.shape), tuple(most_probable.shape), occ.last_path
        ((1, 3, 15, 40), (1, 1, 15, 40), 'plain')
    """

    def __init__(self, nn_module: nn.Module, mask_size: Union[int, Sequence] = 16, n_batch: int = 16,
                 verbose: bool = True, mode: Union[str, float, Callable] = "gaussian",
                 overlap: float = 0.6, activate: Union[bool, Callable] = True) -> None:
        if isinstance(mode, str) and mode not in MODES:
            raise NotImplementedError(f"unknown occlusion mode {mode!r}: use one of {', '.join(MODES)}, "
                                      "a float, or a callable(x, region)")
        self.nn_module = nn_module
        self.mask_size = mask_size
        self.n_batch = n_batch
        self.verbose = verbose
        self.mode = mode
        self.overlap = overlap
        self.activate = activate
        self.last_path: str | None = None
        self.last_path_reason: str | None = None
        self._explainers: dict = {}
        self._explainers_of: Any = nn_module

    def __call__(self, x: Tensor, b_box: Sequence | None = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Occlusion map and most probable class of one image.

        Args:
            x: the image, ``(1, C, *spatial)``.
            b_box: ``[min0, max0, min1, max1, ...]`` to explain only part of
                the image (MONAI's rules: the scan covers the box widened by
                half a mask; a maximum of -1 means the whole axis; the result
                is cropped to ``[min, max)`` per axis, where a maximum <= 0
                means the end of the axis).
            kwargs: passed to the model on every call.

        Returns:
            ``(occ_map, most_probable_class)``, MetaTensors of shapes
            ``(1, classes, *spatial)`` (the default dtype, float32, whatever
            ``x``'s dtype, as MONAI) and ``(1, 1, *spatial)``
            (int64, ``occ_map.argmax(1, keepdim=True)``), cropped to ``b_box``.

        Afterwards ``last_path`` (``"plain"`` or ``"incremental"``) and
        ``last_path_reason`` say which engine inferred the windows and why.

        Raises:
            ValueError: ``x`` holds more than one image, ``mask_size`` is
                larger than the image, or ``overlap`` is outside ``[0, 1)``.
            TypeError: ``mode`` is not a string, a float or a callable.
        """
        if x.shape[0] > 1:
            raise ValueError(f"Expected batch size of 1, got x of shape {tuple(x.shape)}: "
                             "explain one image at a time, e.g. x[i:i + 1]")
        if self.n_batch < 1:
            raise ValueError(f"n_batch must be at least 1, got {self.n_batch}")
        spatial = tuple(x.shape[2:])
        grid = window_grid(spatial, ensure_tuple_rep(self.mask_size, len(spatial)),
                           ensure_tuple_rep(self.overlap, len(spatial)), b_box)
        rule = occlusion_rule(self.mode, x, grid)
        path, reason = self.choose_path(x, rule, kwargs, grid)
        logger.debug("OcclusionSensitivity: %d windows of %s, %s path (%s)", grid.n_windows,
                     grid.mask_size, path, reason)
        with eval_mode(self.nn_module):
            if path == "incremental":
                outputs = self.incremental_outputs(x, grid, rule, kwargs)
            else:
                outputs = self.plain_outputs(x, grid, rule, kwargs)
        self.last_path, self.last_path_reason = path, reason

        # MONAI blends in x's dtype but returns the dtype of an empty MetaTensor
        # (the default dtype); blending in float64 stays within its rounding
        region_map = blend_windows(outputs.to(torch.float64), grid, self.blend_weights(x, grid))
        region_map = region_map.to(torch.get_default_dtype())
        if b_box is None:
            occ_map = MetaTensor(region_map)
        else:
            # MONAI computes the scanned region, pads it back to the image with
            # zeros, then crops [min, max) -- rules that differ from the scan's
            # (a maximum of 0 means the end here), so the result can hold zeros
            full = region_map.new_zeros((region_map.shape[0], *spatial))
            full[(slice(None), *grid.region_slices())] = region_map
            roi_start = [max(b, 0) for b in b_box[::2]]
            roi_end = [b if b > 0 else s for b, s in zip(b_box[1::2], spatial)]
            occ_map = SpatialCrop(roi_start=roi_start, roi_end=roi_end)(MetaTensor(full))
        occ_map = occ_map[None]
        return occ_map, occ_map.argmax(dim=1, keepdim=True)

    # --- the seam: engines -------------------------------------------------------------------

    def choose_path(self, x: Tensor, rule: OcclusionRule, kwargs: Mapping[str, Any],
                    grid: Optional[WindowGrid] = None) -> tuple[str, str]:
        """Which engine infers the windows, and why: ``("plain" | "incremental", reason)``.

        Called before the model is put in eval mode, so ``self.nn_module.training``
        is still the caller's. An incremental engine adds its own conditions
        (the model traces, ...) before the last line and returns
        ``("incremental", reason)`` when they hold.
        """
        if rule.fn is not None:
            return "plain", "mode is a callable, which may write anything into a window"
        if kwargs:
            return "plain", f"extra model arguments ({', '.join(sorted(kwargs))})"
        if getattr(self.nn_module, "training", False):
            return "plain", "the model is in training mode"
        if not isinstance(self.nn_module, nn.Module):
            return "plain", "the model is not an nn.Module"
        if not 1 <= x.ndim - 2 <= 3:
            return "plain", f"{x.ndim - 2} spatial axes (the incremental engine takes 1 to 3)"
        if x.dtype != common.model_dtype(self.nn_module) or not x.is_floating_point():
            return "plain", f"the image is {x.dtype} but the model computes in {common.model_dtype(self.nn_module)}"
        if grid is None:
            return "plain", "no window grid"
        try:
            self._explainer(x, rule.mode, grid)
        except TraceError as e:
            return "plain", f"the model does not trace: {str(e).splitlines()[0]}"
        return "incremental", f"{rule.mode} occlusion of a traceable model: exact incremental inference"

    def incremental_outputs(self, x: Tensor, grid: WindowGrid, rule: OcclusionRule,
                            kwargs: Mapping[str, Any]) -> Tensor:
        """The same ``(n_windows, classes)`` array as :meth:`plain_outputs`, by incremental inference.

        The windows are the explainer's positions (``grid.axis_starts``, row-major as MONAI
        scans them); each mode is an input-occlusion rule of the compiled graph: a constant
        colour (float, ``mean_img``: this image's colour), the window times MONAI's Gaussian
        profile (gaussian), the window times its own mean (``mean_patch``: a factor per
        position). Outputs are activated per batch of ``n_batch`` windows, as MONAI does.
        """
        ex = self._explainer(x, rule.mode, grid)
        image = plain_tensor(x)[0]
        scale = rule.window_mul if rule.mode == "mean_patch" else None
        color = rule.add.reshape(1).expand(x.shape[1]) if rule.mode == "constant" else None
        _, inputs = ex.prepare(image, scale=scale, color=color)
        logits = ex.run_outputs(torch.arange(grid.n_windows), inputs, batch_size=self.n_batch,
                                progress=self.verbose).to(device=x.device, dtype=x.dtype)
        return torch.cat([activate_outputs(logits[i:i + self.n_batch], self.activate, x.shape[1])
                          for i in range(0, grid.n_windows, self.n_batch)])

    def _explainer(self, x: Tensor, mode: str, grid: WindowGrid) -> Explainer:
        """The compiled explainer for this image size, window grid and mode (one per key)."""
        key = (tuple(x.shape[1:]), grid.mask_size, grid.axis_starts, mode, x.dtype, str(x.device))
        if self._explainers_of is not self.nn_module:  # a new model: the old ones are stale
            self._explainers, self._explainers_of = {}, self.nn_module
        if key not in self._explainers:
            if mode == "gaussian":
                fill = PatchFill(weight=gaussian_profile(x, grid.mask_size)[0])
            elif mode == "mean_patch":
                fill = PatchFill(scaled=True)
            else:  # a constant: the colour (MONAI's float or the image's mean) comes with each image
                fill = PatchFill(image_color=True)
            self._explainers[key] = compile_explainer(
                self.nn_module, patch=grid.mask_size, image_size=tuple(x.shape[2:]), channels=x.shape[1],
                output="logit", device=x.device, batch_size=self.n_batch, axis_starts=grid.axis_starts,
                fill=fill, color=0.0)
        return self._explainers[key]

    def plain_outputs(self, x: Tensor, grid: WindowGrid, rule: OcclusionRule,
                      kwargs: Mapping[str, Any]) -> Tensor:
        """Activated outputs of every occluded image, ``(n_windows, classes)``, by plain inference.

        Batches of ``n_batch`` windows in the grid's order, each a copy of the
        image with one window occluded, as MONAI's predictor builds them.
        """
        image = plain_tensor(x)
        batches = range(0, grid.n_windows, self.n_batch)
        if self.verbose:
            batches = tqdm(batches)  # MONAI's bar: one step per batch, no description
        outputs = []
        for first in batches:
            indices = range(first, min(first + self.n_batch, grid.n_windows))
            images = image.repeat(len(indices), *[1] * (image.ndim - 1))
            for b, i in enumerate(indices):
                box = (slice(b, b + 1), slice(None), *grid.window_slices(i))
                images[box] = rule.occlude(x, images[box], i)
            logits = self.nn_module(images, **kwargs)
            outputs.append(activate_outputs(logits, self.activate, x.shape[1]))
        return torch.cat(outputs)

    def blend_weights(self, x: Tensor, grid: WindowGrid) -> Tensor:
        """One window's weight in the per-voxel mean: MONAI's importance map.

        Gaussian (sigma 0.125 * window, floored at 1e-3) in gaussian mode,
        ones otherwise.
        """
        blend = "gaussian" if self.mode == "gaussian" else "constant"
        return compute_importance_map(grid.mask_size, mode=blend, sigma_scale=_BLEND_SIGMA_SCALE,
                                      device=x.device, dtype=x.dtype)
