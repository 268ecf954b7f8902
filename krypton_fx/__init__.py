"""krypton_fx: fast occlusion explanations of CNN predictions.

A torch.fx graph compiler that turns any traceable CNN into an incremental
graph recomputing only the region each occlusion patch changes (exact), or a
bounded part of it (approximate). See ``docs/design.md`` and the KRYPTON paper
(Nakandala, Kumar and Papakonstantinou, SIGMOD 2019).

Example:
    >>> import torch, torchvision, krypton_fx
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> ex = krypton_fx.compile(model, patch=16, stride=8, image_size=(64, 64))
    >>> res = ex(torch.rand(3, 64, 64))
    >>> tuple(res.heatmap.shape)
    (7, 7)
"""

from . import geometry, registry, tracing
from .approx import DrillDown, TuneResult, tune
from .explainer import Explainer, OcclusionResult, SegmentResult, clear_cache, compile, naive_occlusion
from .report import theoretical_speedup
from .scale import explain_many
from .targets import SegmentationTarget
from .tracing import TraceError, trace

__version__ = "0.1.0"

__all__ = ["compile", "clear_cache", "naive_occlusion", "theoretical_speedup", "Explainer", "OcclusionResult",
           "SegmentResult",
           "trace", "TraceError", "geometry", "registry", "tracing",
           "DrillDown", "tune", "TuneResult", "explain_many", "SegmentationTarget"]
