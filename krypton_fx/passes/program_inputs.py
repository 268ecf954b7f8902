"""What an incremental program takes besides its positions: the stored activations of the
unoccluded image (:class:`StoredSpec`) and what the occluded patch holds (:class:`PatchFill`),
with the per-image inputs a fill adds to the graph."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .graph_fns import channels_last

__all__ = ["StoredSpec", "PatchFill", "NO_FILL"]


@dataclasses.dataclass(frozen=True)
class StoredSpec:
    """One stored activation the incremental graph reads.

    Attributes:
        node: name of the node in the traced graph whose value is stored.
        pad: ``(before, after)`` padding per spatial axis so every read window fits.
        fill: padding value (0 for conv and avg-pool, -inf for max-pool).
    """

    node: str
    pad: tuple[tuple[int, int], ...]
    fill: float

    def prepare(self, value: Tensor) -> Tensor:
        """Pad a captured activation and lay it out channels-last for gathers."""
        if any(a or b for a, b in self.pad):
            flat = [v for before_after in reversed(self.pad) for v in before_after]  # F.pad: last axis first
            value = F.pad(value, flat, value=self.fill)
        return value.contiguous(memory_format=channels_last(len(self.pad)))


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: it may hold a tensor
class PatchFill:
    """What the occluded patch holds, beyond a plain colour (MONAI's occlusion modes).

    Inside the patch the image becomes ``image * w + color`` with
    ``w = weight[c, i] * scale[b]`` (a missing factor is 1); with neither
    factor the colour replaces the image (``w = 0``), as in plain occlusion.
    A *segment* (feature ablation, ``segments``) changes only the elements of the
    patch whose label is the row's segment id, to the colour or a baseline image.

    Attributes:
        weight: ``(C or 1, *patch)`` profile the patch multiplies the image by
            (MONAI's gaussian mode), or None.
        scaled: each position has its own factor, given per image as the
            graph's ``occlusion_scale`` input (``(P,)``, MONAI's mean_patch).
        image_color: the colour is given per image as the graph's
            ``occlusion_color`` input (``(C,)``, MONAI's mean_img), instead of
            the compiled one.
        segments: a row is a segment: its "position" is ``segment * P + grid
            position`` (``P`` grid positions; two segments may share a grid position, so
            a row is not a position), and the graph takes per image ``segment_ids_<i>``,
            the image's segment of every element ``(1, C, *S)`` (int64 ``0..S-1``) padded
            as stored input ``i`` (each stored copy of the image); only elements of the
            patch of the row's segment change.
        baseline_image: with ``segments``, the ablated elements take the values of
            ``occlusion_baseline_<i>``, a ``(1, C, *S)`` image padded as stored input
            ``i``, instead of the colour.
    """

    weight: Optional[Tensor] = None
    scaled: bool = False
    image_color: bool = False
    segments: bool = False
    baseline_image: bool = False

    @property
    def reads_image(self) -> bool:
        """The patch's values depend on the image under it."""
        return self.weight is not None or self.scaled or self.segments

    def per_image_inputs(self, stored: list[StoredSpec], source: str) -> list[tuple[str, int]]:
        """The graph's inputs after ``*stored``, in order, as ``(name, stored index)``: the
        index of the stored image a segment input is padded as (-1 where none)."""
        names = [("occlusion_scale", -1)] * self.scaled + [("occlusion_color", -1)] * self.image_color
        if self.segments:
            for i, spec in enumerate(stored):
                if spec.node == source:
                    names.append(("segment_ids", i))
                    names += [("occlusion_baseline", i)] * self.baseline_image
        return names


NO_FILL = PatchFill()  # a plain colour: the default of every compile (one object: compared by identity)
