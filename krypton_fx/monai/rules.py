"""What MONAI 1.6's ``OcclusionSensitivity`` writes into each window, and its activation.

Every mode replaces window ``i``'s region of the image (all channels) by
``region * mul_i + add_i`` (MONAI's ``predictor``), or, for a callable mode,
by ``mode(x, region)``:

=============  ==========================================  =============================
mode           mul                                         add
=============  ==========================================  =============================
``gaussian``   ``1 - gaussian`` profile, ``(1, C, *mask)``  0
float ``v``    0                                           ``v``
``mean_img``   0                                           mean of the whole image
``mean_patch`` mean of window ``i``'s region, per window   0
=============  ==========================================  =============================

``mean_patch`` *multiplies* the region by its mean: MONAI 1.6.1 unpacks
``constant_occlusion``'s ``(mul, add)`` as ``add, mul`` for that mode, and
this module keeps MONAI's answer.

Example:
    >>> import torch
    >>> from krypton_fx.monai.windows import window_grid
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> grid = window_grid((4, 4), mask_size=(2, 2), overlap=0)
    >>> rule = occlusion_rule(2.5, x, grid)
    >>> rule.occluded_regions(x, grid, [0])[0, 0].tolist()
    [[2.5, 2.5], [2.5, 2.5]]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import torch
from monai.transforms import Compose, GaussianSmooth, Lambda, ScaleIntensity
from torch import Tensor

from .windows import WindowGrid

__all__ = ["OcclusionRule", "occlusion_rule", "gaussian_profile", "window_means", "activate_outputs",
           "MODES"]

MODES = ("gaussian", "mean_patch", "mean_img")


def plain_tensor(t: Tensor) -> Tensor:
    """``t`` without MONAI's metadata (MetaTensor arithmetic is slow and changes nothing here)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else t


@dataclasses.dataclass(frozen=True)
class OcclusionRule:
    """How every window of one scan is occluded, as data.

    Window ``i``'s region becomes ``region * mul_i + add`` where ``mul_i`` is
    ``window_mul[i]`` when ``window_mul`` is set and ``mul`` otherwise; with
    ``fn`` set it becomes ``fn(x, region)`` instead.

    Attributes:
        mode: ``"gaussian"``, ``"constant"`` (a float or ``mean_img``),
            ``"mean_patch"`` or ``"callable"``.
        mul: factor shared by all windows: a ``(1, C, *mask)`` profile or a
            0-dim tensor, in the image's dtype.
        add: term shared by all windows: a 0-dim tensor in the image's dtype.
        window_mul: ``mean_patch`` only: ``(n_windows,)`` per-window factors.
        fn: callable mode only: ``fn(x, region) -> occluded region``.
    """

    mode: str
    mul: Tensor
    add: Tensor
    window_mul: Optional[Tensor] = None
    fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None

    def occlude(self, x: Tensor, region: Tensor, index: int) -> Tensor:
        """Window ``index``'s occluded region; ``region`` is ``(1, C, *mask)``, ``x`` the image."""
        if self.fn is not None:
            return self.fn(x, region)
        mul = self.mul if self.window_mul is None else self.window_mul[index]
        return region * mul + self.add

    def occluded_regions(self, x: Tensor, grid: WindowGrid, indices: Sequence[int]) -> Tensor:
        """The occluded regions of several windows, ``(len(indices), C, *mask)``.

        What an engine writes into window ``i``'s box of the image; the rest
        of the image is unchanged.
        """
        regions = [plain_tensor(x)[(slice(None), slice(None), *grid.window_slices(i))] for i in indices]
        return torch.cat([self.occlude(x, r, i) for r, i in zip(regions, indices)])


def gaussian_profile(x: Tensor, mask_size: Sequence[int], sigma: float = 0.25) -> Tensor:
    """MONAI's Gaussian occlusion factor: 0 at the window centre, 1 at its edges.

    A unit impulse at the centre voxel (``m // 2``), smoothed with MONAI's
    ``GaussianSmooth`` (sigma ``sigma * m`` per axis), negated and min-max
    scaled to ``[0, 1]`` by ``ScaleIntensity``, as ``gaussian_occlusion``.

    Returns:
        ``(1, C, *mask_size)`` in ``x``'s dtype and device.

    Example:
        >>> p = gaussian_profile(torch.zeros(1, 1, 5, 5), (5, 5))
        >>> float(p[0, 0, 2, 2]), float(p.max())
        (0.0, 1.0)
    """
    kernel = torch.zeros((x.shape[1], *mask_size), device=x.device, dtype=x.dtype)
    kernel[(slice(None), *[slice(m // 2, m // 2 + 1) for m in mask_size])] = 1.0
    smooth = Compose([GaussianSmooth(sigma=[m * sigma for m in mask_size]), Lambda(lambda t: -t),
                      ScaleIntensity()])
    return plain_tensor(smooth(kernel))[None]


def window_means(x: Tensor, grid: WindowGrid) -> Tensor:
    """Mean of every window's region over all channels, ``(n_windows,)`` in ``x``'s dtype.

    One summed-volume table in float64 answers every window with ``2 ** N``
    lookups, so the means cost no per-window pass over the image.

    Example:
        >>> from krypton_fx.monai.windows import window_grid
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> window_means(x, window_grid((4, 4), mask_size=(2, 2), overlap=0)).tolist()
        [2.5, 4.5, 10.5, 12.5]
    """
    table = plain_tensor(x)[0].to(torch.float64).sum(0)
    for axis in range(table.ndim):
        table = torch.nn.functional.pad(table.cumsum(axis), [0, 0] * (table.ndim - 1 - axis) + [1, 0])
    corners = grid.corners(device=x.device)
    mask = torch.tensor(grid.mask_size, device=x.device)
    total = torch.zeros(grid.n_windows, dtype=torch.float64, device=x.device)
    for far in range(2 ** table.ndim):  # inclusion-exclusion over the box's corners
        bits = torch.tensor([(far >> a) & 1 for a in range(table.ndim)], device=x.device)
        sign = -1.0 if (table.ndim - int(bits.sum())) % 2 else 1.0
        total += sign * table[tuple((corners + bits * mask).T)]
    return (total / (x.shape[1] * float(mask.prod()))).to(x.dtype)


def occlusion_rule(mode: Union[str, float, Callable], x: Tensor, grid: WindowGrid) -> OcclusionRule:
    """The rule MONAI applies for ``mode`` to image ``x`` scanned by ``grid``.

    Raises:
        NotImplementedError: an unknown mode string (MONAI's error).
        TypeError: a mode that is neither a string, a float nor a callable (an
            int included: MONAI only takes floats, and fails on others when called).
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if callable(mode):
        return OcclusionRule("callable", zero, zero, fn=mode)
    if isinstance(mode, float):
        return OcclusionRule("constant", zero, torch.tensor(mode, dtype=x.dtype, device=x.device))
    if isinstance(mode, str):
        if mode not in MODES:
            raise NotImplementedError(f"unknown occlusion mode {mode!r}: use one of {', '.join(MODES)}, "
                                      "a float, or a callable(x, region)")
        if mode == "gaussian":
            return OcclusionRule("gaussian", gaussian_profile(x, grid.mask_size), zero)
        if mode == "mean_img":
            # .item() as MONAI: the mean leaves the image's dtype through a Python float
            return OcclusionRule("constant", zero, torch.tensor(x.mean().item(), dtype=x.dtype, device=x.device))
        return OcclusionRule("mean_patch", zero, zero, window_mul=window_means(x, grid))
    raise TypeError(f"mode must be 'gaussian', 'mean_patch', 'mean_img', a float or a callable, got "
                    f"{type(mode).__name__} {mode!r}" + (f"; pass float({mode!r})" if isinstance(mode, int) else ""))


def activate_outputs(outputs: Any, activate: Union[bool, Callable], in_channels: int) -> Tensor:
    """MONAI's activation of a batch of model outputs.

    A callable is applied as is; ``True`` means sigmoid when the *input image*
    has one channel and softmax over dim 1 otherwise (MONAI's rule, whatever
    the number of classes); ``False`` leaves the outputs alone.

    Raises:
        ValueError: the outputs are not a ``(batch, classes)`` tensor.

    Example:
        >>> activate_outputs(torch.zeros(2, 3), True, in_channels=1).tolist()
        [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """
    if callable(activate):
        outputs = activate(outputs)
    elif activate:
        outputs = outputs.sigmoid() if in_channels == 1 else outputs.softmax(1)
    if not isinstance(outputs, Tensor) or outputs.ndim != 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(f"occlusion sensitivity needs (batch, classes) outputs from the model (after "
                         f"activate), got {shape}: wrap the model so that it returns class scores")
    return outputs
