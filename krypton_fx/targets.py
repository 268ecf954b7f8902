"""Targets: what each occlusion position records of the model's output (docs/design.md,
"Perturbations and targets").

A target is resolved once per image from the unoccluded output (which classes: the
prediction, given labels, the top k, all of them) into a :class:`Resolved` target,
which turns the output of every batch of positions into ``(B, K)`` values and holds
the ``K`` unoccluded values. :class:`ClassTarget` is the classifier's target, applied
after the incremental graph. :class:`SegmentationTarget` is a dense output's target:
the rewrite appends its reduction to the incremental graph (:func:`reduce_patched`,
:func:`reduce_dense`), whose per-image inputs (the mask) it resolves per image
(``Resolved.inputs``).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import common

__all__ = ["ClassTarget", "Resolved", "class_target", "SegmentationTarget", "ResolvedDense",
           "category_values", "reduce_patched", "reduce_dense", "select_output", "SEGMENTATION_OUTPUTS",
           "REDUCTIONS"]

Labels = Union[None, str, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A target resolved for one image.

    Attributes:
        labels: the ``K`` explained classes (the map of ``labels[k]`` is column ``k``).
        base: their ``K`` values without occlusion.
        output: ``"prob"`` or ``"logit"``: what the values are.
        inputs: per-image inputs the incremental graph takes after the stored
            activations (a dense target's mask); none for a classifier.
    """

    labels: tuple[int, ...]
    base: tuple[float, ...]
    output: str
    inputs: tuple[Tensor, ...] = ()

    def __call__(self, outputs: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        """``(B, K)`` float32 values of a batch's outputs (``(B, classes)``)."""
        return common.scores(outputs, list(self.labels), self.output)


@dataclasses.dataclass(frozen=True)
class ClassTarget:
    """A classifier's target: the probability (or logit) of one or more classes.

    Attributes:
        labels: None (the unoccluded prediction), an int, several ints, or ``"all"``.
        top_k: instead of ``labels``, the ``k`` classes the unoccluded image scores highest
            (highest first).
        output: ``"prob"`` (softmax over classes) or ``"logit"``.

    Example:
        >>> import torch
        >>> t = ClassTarget(labels=[2, 0]).resolve(torch.tensor([[0.0, 1.0, 2.0]]))
        >>> t.labels, t(torch.tensor([[0.0, 0.0, 0.0]])).shape
        ((2, 0), torch.Size([1, 2]))
    """

    labels: Labels = None
    top_k: Optional[int] = None
    output: str = "prob"

    def resolve(self, logits: Tensor) -> Resolved:
        """The target for the image whose unoccluded output is ``logits`` (``(1, classes)``)."""
        if logits.dim() != 2:
            raise ValueError(f"the model must return class scores of shape (N, classes), got "
                             f"{tuple(logits.shape)}")
        classes = logits.shape[-1]
        values = common.scores(logits, list(range(classes)), self.output)[0]
        if self.top_k is not None:
            picked = [int(i) for i in values.float().argsort(descending=True, stable=True)[:self.top_k]]
        elif self.labels == "all":
            picked = list(range(classes))
        elif self.labels is None:
            picked = [int(logits.argmax(1))]
        else:
            picked = [common.label_index(v, classes) for v in self.labels]
        return Resolved(tuple(picked), tuple(float(values[i]) for i in picked), self.output)


def class_target(label=None, labels: Labels = None, top_k: Optional[int] = None,
                 output: str = "prob") -> ClassTarget:
    """The :class:`ClassTarget` of an explainer call's ``label=``, ``labels=`` or ``top_k=``
    (at most one of them), checked.

    Example:
        >>> class_target(labels="all").labels, class_target(top_k=3).top_k, class_target(5).labels
        ('all', 3, (5,))
    """
    given = [name for name, v in (("label", label), ("labels", labels), ("top_k", top_k)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of label=, labels= and top_k= (got {' and '.join(given)})")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        return ClassTarget(top_k=int(top_k), output=output)
    if label is not None:
        return ClassTarget(labels=(label,), output=output)
    if labels is None or labels == "all":
        return ClassTarget(labels=labels, output=output)
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (Sequence, Tensor)) or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty sequence of class indices or 'all', got {labels!r}")
    return ClassTarget(labels=tuple(labels), output=output)


# --- dense outputs (segmentation) ----------------------------------------------------

SEGMENTATION_OUTPUTS = ("prob", "sigmoid", "logit")
REDUCTIONS = ("mean", "sum")


def category_values(output: Tensor, category: int, kind: str) -> Tensor:
    """``(N, 1, *S)`` float32 values of ``category`` in a dense output ``(N, C, *S)``: the softmax
    over channels (``"prob"``), the channel's sigmoid (``"sigmoid"``) or the raw channel
    (``"logit"``). Per element, so a patch of the output gives the patch of the values."""
    output = output.float()
    if kind == "prob":
        return torch.softmax(output, dim=1)[:, category:category + 1]
    channel = output[:, category:category + 1]
    return torch.sigmoid(channel) if kind == "sigmoid" else channel


def reduce_dense(output: Tensor, maps: Tensor, totals: Tensor, category: int, kind: str) -> Tensor:
    """``(B, 1)`` target values of a batch of full outputs ``(B, C, *S)``: the reduction over the
    mask of ``category``'s values. ``maps``: ``(1, 2, *S)``, the mask (weights) then the mask
    times the unoccluded values; ``totals``: float64 ``[unoccluded total, scale]`` (scale
    ``1 / sum(mask)`` for a mean, 1 for a sum)."""
    new = category_values(output, category, kind)
    total = (maps[:, :1] * new).flatten(1).sum(1)
    return (total.double() * totals[1]).float()[:, None]


def reduce_patched(patch: Tensor, old: Tensor, totals: Tensor, category: int, kind: str) -> Tensor:
    """``(B, 1)`` target values of a batch whose output is patched: the unoccluded total, minus
    the box's old contribution, plus its new one (docs/design.md, "Target").

    Args:
        patch: ``(B, C, *box)`` the output's patch per position.
        old: ``(B, 2, *box)`` the target's maps (:func:`reduce_dense`) gathered over each box.
        totals: float64 ``[unoccluded total, scale]``.
        category: the explained channel.
        kind: ``"prob"``, ``"sigmoid"`` or ``"logit"``.
    """
    new = category_values(patch, category, kind)
    delta = (old[:, :1] * new - old[:, 1:]).flatten(1).sum(1)
    return ((totals[0] + delta.double()) * totals[1]).float()[:, None]


def select_output(out, key: Optional[str]):
    """The dense map a model returns: ``out`` itself, or ``out[key]`` of a dict output
    (torchvision's segmentation models return ``{"out": ..., "aux": ...}``)."""
    if key is not None:
        if not isinstance(out, dict) or key not in out:
            keys = sorted(out) if isinstance(out, dict) else None
            raise ValueError(f"SegmentationTarget(key={key!r}): the model returns "
                             f"{'a dict with keys ' + str(keys) if keys is not None else type(out).__name__}, "
                             f"not a dict with {key!r}")
        return out[key]
    if isinstance(out, dict):
        raise ValueError(f"the model returns a dict (keys {sorted(out)}), not a tensor. Hint: give the key of the "
                         f"map to explain, SegmentationTarget(..., key={next(iter(out))!r}), or wrap the model: "
                         "forward(x) = model(x)['out']")
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class ResolvedDense(Resolved):
    """A dense output's target resolved for one image: the incremental graph returns the
    ``(B, 1)`` values itself (its reduction node), given ``inputs`` = ``(maps, totals)``.

    Attributes:
        mask: the ``(*S)`` float32 weights reduced over (given, or predicted from this image).
    """

    mask: Optional[Tensor] = None

    def __call__(self, outputs: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return outputs.float().reshape(-1, 1)


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentationTarget:
    """A dense output's target: each heat-map cell is the reduction over ``mask`` of
    ``category``'s value in the occluded output (docs/design.md, "Target").

    Pass it as ``krypton_fx.compile(model, ..., target=SegmentationTarget(1))``. The output
    layer is never recomputed at full size: the incremental graph ends in one node that
    adds the change inside the output's patch to the unoccluded total.

    Attributes:
        category: the output channel explained.
        mask: ``(*S)`` bool or float weights over the output's spatial shape ``S``; None: the
            pixels the *unoccluded* model assigns to ``category`` (argmax over channels; for
            ``output="sigmoid"`` the channel's sigmoid > 0.5), frozen from the unoccluded pass.
            A call's ``mask=`` replaces it for that image. Compared by identity (compile's
            cache: the same tensor object is the same target).
        output: ``"prob"`` (softmax over channels), ``"sigmoid"`` (per channel, single-channel
            binary nets) or ``"logit"`` (raw).
        reduce: ``"mean"`` (weighted by the mask) or ``"sum"`` (pytorch-grad-cam's and Captum's
            convention with ``output="logit"``).
        key: for a model that returns a dict (torchvision's ``{"out": ...}``), the entry explained.

    Example:
        >>> import torch
        >>> t = SegmentationTarget(1, output="logit", reduce="sum")
        >>> r = t.resolve(torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]]))  # (1, 2, 1, 2)
        >>> r.labels, r.base, r.mask.tolist()
        ((1,), (1.0,), [[1.0, 0.0]])
    """

    category: int
    mask: Optional[Tensor] = None
    output: str = "prob"
    reduce: str = "mean"
    key: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.category, bool) or not isinstance(self.category, (int,)) or self.category < 0:
            index = common.label_index(self.category, 1 << 62) if isinstance(self.category, Tensor) else None
            if index is None:
                raise ValueError(f"category must be a non-negative int (an output channel), got {self.category!r}")
            object.__setattr__(self, "category", index)
        if self.output not in SEGMENTATION_OUTPUTS:
            raise ValueError(f"output must be one of {SEGMENTATION_OUTPUTS}, got {self.output!r}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        if self.key is not None and not isinstance(self.key, str):
            raise TypeError(f"key must be a str (the output dict's entry) or None, got {self.key!r}")
        if self.mask is not None:
            _check_mask_type(self.mask)

    def _identity(self) -> tuple:
        return (self.category, self.output, self.reduce, self.key, id(self.mask) if self.mask is not None else None)

    def __eq__(self, other) -> bool:
        return isinstance(other, SegmentationTarget) and other._identity() == self._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        mask = "None" if self.mask is None else f"<{tuple(self.mask.shape)} tensor>"
        key = f", key={self.key!r}" if self.key is not None else ""
        return (f"SegmentationTarget(category={self.category}, mask={mask}, output={self.output!r}, "
                f"reduce={self.reduce!r}{key})")

    def predicted_mask(self, output: Tensor) -> Tensor:
        """``(*S)`` bool: the pixels the unoccluded ``output`` (``(1, C, *S)``) assigns to the category."""
        if self.output == "sigmoid":
            return (torch.sigmoid(output[0, self.category].float()) > 0.5)
        return output[0].argmax(0) == self.category

    def resolve(self, output: Tensor, mask: Optional[Tensor] = None) -> ResolvedDense:
        """The target for the image whose unoccluded (dense) output is ``output`` ``(1, C, *S)``;
        ``mask`` replaces the compiled one for this image."""
        if output.dim() < 3:
            raise ValueError(f"a SegmentationTarget needs a dense output (N, classes, *spatial), got "
                             f"{tuple(output.shape)}: for a classifier leave target= out")
        channels, spatial = output.shape[1], tuple(output.shape[2:])
        if self.category >= channels:
            raise ValueError(f"category {self.category} is out of range: the model's output has {channels} "
                             f"channel(s) (categories 0..{channels - 1})")
        given = mask if mask is not None else self.mask
        if given is None:
            weights = self.predicted_mask(output).float()
            if not bool(weights.any()):
                raise ValueError(f"the predicted mask is empty: the unoccluded model assigns no pixel to category "
                                 f"{self.category}. Hint: give mask= explicitly, or explain another category")
        else:
            weights = _mask_weights(given, spatial)
        weights = weights.to(output.device)
        values = category_values(output, self.category, self.output)[0, 0]
        contribution = weights * values
        total = float(contribution.double().sum())
        scale = 1.0 / float(weights.double().sum()) if self.reduce == "mean" else 1.0
        maps = torch.stack([weights, contribution])[None].contiguous(memory_format=_channels_last(len(spatial)))
        totals = torch.tensor([total, scale], dtype=torch.float64, device=output.device)
        return ResolvedDense((self.category,), (total * scale,), self.output, (maps, totals),
                             mask=weights.cpu())


def _channels_last(ndim: int):
    return {2: torch.channels_last, 3: torch.channels_last_3d}.get(ndim, torch.contiguous_format)


def _check_mask_type(mask) -> None:
    if not isinstance(mask, Tensor) or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise TypeError(f"mask must be a bool or float tensor of the output's spatial shape, got "
                        f"{type(mask).__name__ if not isinstance(mask, Tensor) else str(mask.dtype)}")


def _mask_weights(mask: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """A given mask as float32 weights of shape ``spatial``, checked."""
    _check_mask_type(mask)
    shape = tuple(mask.shape)
    while len(shape) > len(spatial) and shape[0] == 1:
        shape = shape[1:]
    if shape != spatial:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, but the model's output is {spatial}: give one "
                         "weight per output pixel")
    weights = mask.detach().reshape(spatial).float()
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("mask holds non-finite weights")
    if not bool(weights.any()):
        raise ValueError("the mask is empty (all zero): give at least one pixel to reduce over")
    return weights
