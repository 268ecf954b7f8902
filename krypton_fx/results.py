"""What an occlusion run returns: the heat map with its label and statistics."""

from __future__ import annotations

import dataclasses
from typing import Optional

from torch import Tensor

__all__ = ["OcclusionResult", "RunStats"]


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
    """

    heatmap: Tensor
    label: int
    base_prob: float
    stride: tuple[int, int]
    patch: tuple[int, int]
    output: str = "prob"
    stats: "RunStats" = dataclasses.field(default_factory=lambda: RunStats(0, 0))


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
        exact_cells: approximate modes: bool tensor shaped like the heat map, True
            where the cell was computed exactly (tau = 1, the compiled patch); None
            in exact mode, where every cell is.
        peak_positions: approximate modes: positions the peak rule recomputed
            exactly (:func:`krypton_fx.peak.refine_peak`).
        margin: approximate modes: the peak rule's margin (None: the rule was off).
        peak_bounded: approximate modes: True where every approximate cell's drop
            was bounded by a tau = 1 occluder containing its patch (drill-down's
            covering stage one): the map's peak is the exact map's whenever a larger
            occluder drops at least ``1 - margin`` times as much as one it contains.
            False: the approximate values were estimates.
        stage1_patch: drill-down: stage-one patch in pixels.
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
    exact_cells: Optional[Tensor] = None
    peak_positions: Optional[int] = None
    margin: Optional[float] = None
    peak_bounded: Optional[bool] = None
    stage1_patch: Optional[tuple[int, ...]] = None

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
