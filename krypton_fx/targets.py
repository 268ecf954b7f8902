"""Targets: what each occlusion position records of the model's output (docs/design.md,
"Perturbations and targets").

A target is resolved once per image from the unoccluded output (which classes: the
prediction, given labels, the top k, all of them) into a :class:`Resolved` target,
which turns the output of every batch of positions into ``(B, K)`` values and holds
the ``K`` unoccluded values. :class:`ClassTarget` is the classifier's target, applied
after the incremental graph; a dense-output target (segmentation) follows the same
protocol and may add per-image inputs to the graph (``Resolved.inputs``).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Sequence, Union

from torch import Tensor

from . import common

__all__ = ["ClassTarget", "Resolved", "class_target"]

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
