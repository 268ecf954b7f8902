"""What an occlusion run returns: the heat map with its label and statistics, and what a notebook
shows of it (the pictures are :mod:`krypton_fx.result_views`', imported when first drawn)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from torch import Tensor

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

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
        output: ``"prob"`` or ``"logit"`` (a segmentation target's: also ``"sigmoid"``).
        stats: counts and time of the run (:class:`RunStats`).
        heatmaps: ``(K, *grid)``: one map per explained class, ``heatmaps[k]`` that of
            ``labels[k]`` (a call with ``labels=`` or ``top_k=``; else ``K = 1``, the map above).
        labels: the ``K`` explained classes; ``labels[0] == label``.
        base_probs: their ``K`` values without occlusion.
        mask: a segmentation target's ``(*S)`` float32 weights the map was reduced over
            (given, or predicted from the unoccluded output); None for classifiers.

    To look at it: :attr:`drop` (``base_prob - heatmap``), :meth:`upsample` (the drop at the
    input's size), :meth:`plot` (a matplotlib figure over the input), :meth:`save` (a PNG);
    in Jupyter a result shows as its map.
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
    mask: Optional[Tensor] = None

    def __post_init__(self):
        if self.heatmaps is None:
            self.heatmaps = self.heatmap.unsqueeze(0)
        if self.labels is None:
            self.labels = [self.label]
        if self.base_probs is None:
            self.base_probs = [self.base_prob]

    @property
    def drop(self) -> Tensor:
        """``base_prob - heatmap``, cell by cell: how much occluding there lowers the score of
        ``label`` (positive: evidence for it; red in the pictures).

        Example:
            >>> import torch
            >>> OcclusionResult(torch.tensor([0.75, 0.25]), 1, 0.75, (4,), (8,)).drop.tolist()
            [0.0, 0.5]
        """
        return self.base_prob - self.heatmap

    def for_label(self, label: int) -> "OcclusionResult":
        """The result of one of ``labels`` (a result of several, ``ex(image, labels=[3, 5])``): its map,
        label and base score; ``label`` itself gives this result."""
        if label == self.label:
            return self
        if label not in self.labels:
            raise ValueError(f"label {label} is not in this result (labels {self.labels}); pick one of those, or "
                             f"explain it: ex(image, labels=[{label}])")
        k = self.labels.index(label)
        return OcclusionResult(self.heatmaps[k], int(label), float(self.base_probs[k]), self.stride, self.patch,
                               self.output, self.stats)

    def upsample(self, size: Optional[Sequence[int]] = None, label: Optional[int] = None) -> "np.ndarray":
        """The drop on the input's grid, as ``krypton-fx explain`` writes it (``--map``): each cell at
        its patch's centre, (bi/tri)linear between centres (:func:`krypton_fx.viz.upsample_heatmap_nd`).

        Args:
            size: the input's spatial size (``(H, W)``, ``(D, H, W)``, ``(L,)``); default the
                least size with this grid, ``(n - 1) * stride + patch`` per axis (pass the
                input's own when its far rows lie past the last patch).
            label: one of ``labels`` (several-label results); default ``label``.

        Returns:
            float64 numpy array of shape ``size``.

        Example:
            >>> import torch
            >>> res = OcclusionResult(torch.tensor([[0.9, 0.5]]), 1, 0.9, (4, 4), (4, 4))
            >>> res.upsample().shape, res.upsample()[0].round(2).tolist()
            ((4, 8), [0.0, 0.0, 0.05, 0.15, 0.25, 0.35, 0.4, 0.4])
        """
        from .result_views import check_input_size, covered_size
        from .viz import upsample_heatmap_nd

        res = self if label is None else self.for_label(label)
        grid = tuple(res.heatmap.shape)
        size = covered_size(grid, self.patch, self.stride) if size is None else tuple(int(n) for n in size)
        check_input_size(size, grid, self.patch, self.stride, "size")
        return res.base_prob - upsample_heatmap_nd(res.heatmap.double().numpy(), size, self.patch, self.stride)

    def plot(self, image: Any = None, label: Optional[int] = None, label_name: Optional[str] = None) -> "Figure":
        """The picture of this map, as the command line draws it: a matplotlib ``Figure`` (no pyplot
        state: in Jupyter it shows when it is a cell's value, elsewhere ``fig.savefig(...)``).

        Args:
            image: the input the map was computed on. An image: the model input ``(C, H, W)``
                (a tensor is channels first), or ``(H, W, C)``, ``(H, W)``, a PIL image;
                8-bit values are divided by 255, values outside ``[0, 1]`` (a normalised input)
                stretched to it (pass the picture before normalisation for its own colours).
                Drawn: the image, the map over it, the map with its colour bar, the label.
                A volume ``(C, D, H, W)`` or ``(D, H, W)``: three orthogonal planes through the
                strongest drop (the first channel, 0.5-99.5th percentile grey scale). A signal
                ``(C, L)`` or ``(L,)``: the signal with the drop behind it and the drop as a line.
                None: the map alone.
            label: one of ``labels`` (several-label results); default ``label``.
            label_name: the class's name, for the title.

        Example:
            >>> fig = res.plot(image)                     # doctest: +SKIP
            >>> fig.savefig("heat.png")                   # doctest: +SKIP
        """
        from .result_views import result_figure

        return result_figure(self if label is None else self.for_label(label), image, label_name)

    def save(self, path: Union[str, "os.PathLike[str]"], image: Any = None, label: Optional[int] = None,
             label_name: Optional[str] = None) -> Path:
        """Write :meth:`plot`'s picture to ``path`` (PNG, or the format its name ends with), to a temporary
        name first and renamed into place: a failure leaves no half-written file. Returns the path."""
        from .result_views import save_figure

        return save_figure(self.plot(image, label, label_name), path)

    def _repr_png_(self) -> bytes:
        """Jupyter's rich display: the map alone, small (the result does not hold its image)."""
        from .result_views import png_bytes

        return png_bytes(self.plot())


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
