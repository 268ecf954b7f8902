"""What an occlusion run returns: the heat map with its label and statistics."""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import Tensor

__all__ = ["OcclusionResult", "RunStats", "SegmentResult"]


@dataclasses.dataclass
class OcclusionResult:
    """An occlusion heat map.

    Attributes:
        heatmap: float32 CPU tensor, one axis per spatial axis: ``(H_M, W_M)``
            for images (``(D_M, H_M, W_M)`` volumes, ``(L_M,)`` signals); cell
            ``(i, j)`` is the probability (or logit) of ``label`` with the
            patch's first corner at ``(i * Sy, j * Sx)``.
        label: the explained class.
        base_prob: probability (or logit) of ``label`` without occlusion.
        stride: ``(Sy, Sx)`` between heat-map cells, in image pixels.
        patch: ``(h, w)`` occlusion patch.
        output: ``"prob"`` or ``"logit"``.
        stats: counts and time of the run (:class:`RunStats`).
        heatmaps: ``(K, *grid)``: one map per explained class, ``heatmaps[k]`` that of
            ``labels[k]`` (a call with ``labels=`` or ``top_k=``; else ``K = 1``, the map above).
        labels: the ``K`` explained classes; ``labels[0] == label``.
        base_probs: their ``K`` values without occlusion.
    """

    heatmap: Tensor
    label: int
    base_prob: float
    stride: tuple[int, int]
    patch: tuple[int, int]
    output: str = "prob"
    stats: "RunStats" = dataclasses.field(default_factory=lambda: RunStats(0, 0))
    heatmaps: Optional[Tensor] = None
    labels: Optional[list[int]] = None
    base_probs: Optional[list[float]] = None

    def __post_init__(self):
        if self.heatmaps is None:
            self.heatmaps = self.heatmap.unsqueeze(0)
        if self.labels is None:
            self.labels = [self.label]
        if self.base_probs is None:
            self.base_probs = [self.base_prob]


@dataclasses.dataclass
class RunStats:
    """What a run did. Also readable as a mapping (``stats["positions_run"]``, ``stats.get(...)``).

    Attributes:
        positions: cells of the heat map.
        batch_size: positions per batch that ran.
        positions_run: positions inferred (fewer than ``positions`` with drill-down).
        seconds: wall-clock time of the run.
        stage1_stride: drill-down: stage-one stride in pixels.
        stage1_positions: drill-down: positions of stage one.
        stage2_positions: drill-down: positions of stage two.
        r: drill-down: fraction of cells refined.
        expected_speedup: drill-down: eq. 46 at the stage-one stride used.
        achieved_speedup: drill-down: ``positions / positions_run``.
        index: :func:`krypton_fx.explain_many`: the image's place in its input.
        source: :func:`krypton_fx.explain_many`: the image's name (a file path, say).
    """

    positions: int
    batch_size: int
    positions_run: Optional[int] = None
    seconds: float = 0.0
    stage1_stride: Optional[tuple[int, ...]] = None
    stage1_positions: Optional[int] = None
    stage2_positions: Optional[int] = None
    r: Optional[float] = None
    expected_speedup: Optional[float] = None
    achieved_speedup: Optional[float] = None
    index: Optional[int] = None
    source: Optional[str] = None

    def __post_init__(self):
        if self.positions_run is None:
            self.positions_run = self.positions

    def __getitem__(self, key: str):
        if key not in {f.name for f in dataclasses.fields(self)} or getattr(self, key) is None:
            raise KeyError(key)
        return getattr(self, key)

    def update(self, **values) -> None:
        """Set fields by name, as ``dict.update`` does (unknown names are an error)."""
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in names:
                raise KeyError(f"RunStats has no field {key!r}")
            setattr(self, key, value)

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default


@dataclasses.dataclass
class SegmentResult:
    """A feature ablation: the model's output with each segment of a label map ablated.

    Attributes:
        scores: float32 CPU ``(S,)``: the probability (or logit) of ``label`` with segment
            ``ids[k]`` replaced by the baseline.
        ids: int64 CPU ``(S,)``: the segment ids, ascending (``torch.unique`` order).
        heatmap: float32 CPU, the mask's shape (``(*spatial)`` for one mask, ``(C,
            *spatial)`` per channel): each element holds its segment's score.
        label: the explained class.
        base_prob: probability (or logit) of ``label`` without ablation.
        output: ``"prob"`` or ``"logit"``.
        stats: counts and time of the run (``positions``: the segments).
        programs: compiled box sizes (buckets) the segments ran in.
        waste: summed area (volume) of the bucket boxes over that of the segments' own
            bounding boxes (1.0: no waste).
    """

    scores: Tensor
    ids: Tensor
    heatmap: Tensor
    label: int
    base_prob: float
    output: str = "prob"
    stats: RunStats = dataclasses.field(default_factory=lambda: RunStats(0, 0))
    programs: int = 0
    waste: float = 1.0

    @property
    def drop(self) -> Tensor:
        """``base_prob - scores``: how much each segment's ablation lowers the output."""
        return self.base_prob - self.scores
