"""Feature ablation with masks: each segment of a label map replaced by a baseline, the
model's output for every one, incrementally (docs/design.md, "Perturbations and targets").

A segment is a perturbation whose box is its bounding box and whose fill writes the
baseline only where the label map holds the segment's id (``PatchFill.segments``). Box
sizes are static per compiled program, so segments are grouped into *buckets*: per
spatial axis, a segment's box is the smallest size of a ladder (:func:`ladder`) that holds
its extent from the aligned start at or before it. A bucket's program is compiled once per
box size over the aligned grid of starts of that size (:func:`grid_starts`: every multiple
of :func:`alignment` that fits, and the start flush with the far border), independent of
any mask, and kept on the build. A row of a bucket's batch is one segment, numbered
``segment * P + grid position`` (two segments may share a start). One unoccluded pass per
image serves all buckets: its capture graph returns every activation that the image's
buckets read; each program pads what it reads.

Waste: per axis the box is at most ``LADDER_RATIO * (extent + alignment - 1)``, the
alignment being ``size // ALIGN_DIVISOR`` (coarser where a grid would pass
:data:`MAX_GRID` starts: small boxes in large volumes); :attr:`SegmentResult.waste` and
``bench/ablation.py`` report the measured area ratio.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor, fx

from . import common
from .build import Build, check_same_output
from .passes.patch_prop import CLEAN, DENSE, META_KEY, annotate
from .passes.program_inputs import PatchFill, StoredSpec
from .passes.rewrite import IncrementalProgram, build_capture_module, rewrite
from .results import RunStats, SegmentResult

if TYPE_CHECKING:
    from .explainer import Explainer

__all__ = ["ablate", "ladder", "alignment", "grid_starts", "place_segments", "segment_boxes",
           "LADDER_RATIO", "ALIGN_DIVISOR", "MIN_BOX"]

logger = logging.getLogger(__name__)

# Box sizes per axis: MIN_BOX, then each about LADDER_RATIO times the last, and the whole
# axis. (1.5 rather than a finer 1.25: 2.5x fewer buckets for the same conv work on
# ResNet18, 7-9 % more on VGG16, and measured 1.2x and 2.1x faster at 56 SLIC segments; a
# bucket costs a batch, which a few rows do not fill.) A bucket of size b starts at
# multiples of max(1, b // ALIGN_DIVISOR), or coarser so that a program's grid has at most
# about MAX_GRID starts (its tables hold a row per start).
LADDER_RATIO = 1.5
ALIGN_DIVISOR = 8
MIN_BOX = 4
MAX_GRID = 1 << 16

Baseline = Union[float, int, Tensor]


def ladder(extent: int) -> list[int]:
    """Box sizes along an axis of ``extent`` elements, ascending.

    Example:
        >>> ladder(40)
        [4, 6, 9, 14, 20, 30, 40]
    """
    sizes, size = [], float(MIN_BOX)
    while round(size) < extent:
        if not sizes or round(size) > sizes[-1]:
            sizes.append(round(size))
        size *= LADDER_RATIO
    return [s for s in sizes if s < extent] + [extent]


def alignment(size: int, extent: int, axes: int) -> int:
    """The step between the starts of a box of ``size`` along an axis of ``extent`` of an input
    with ``axes`` spatial axes: ``size // ALIGN_DIVISOR``, at least 1, and at least what keeps the
    grid within :data:`MAX_GRID` starts (``MAX_GRID ** (1 / axes)`` per axis).

    Example:
        >>> alignment(16, 224, 2), alignment(4, 224, 2), alignment(4, 128, 3)
        (2, 1, 4)
    """
    per_axis = int(round(MAX_GRID ** (1.0 / axes)))
    return max(1, size // ALIGN_DIVISOR, -(-(extent - size + 1) // per_axis))


def grid_starts(extent: int, size: int, axes: int) -> Tensor:
    """The starts of a box of ``size`` along an axis of ``extent``: every multiple of
    :func:`alignment` at which it fits, and the start flush with the far border.

    Example:
        >>> grid_starts(20, 16, 2).tolist()
        [0, 2, 4]
    """
    step = alignment(size, extent, axes)
    starts = list(range(0, extent - size + 1, step))
    if starts[-1] != extent - size:
        starts.append(extent - size)
    return torch.tensor(starts, dtype=torch.int64)


def place_segments(lo: Tensor, hi: Tensor, extent: int, axes: int) -> tuple[Tensor, Tensor]:
    """Each segment's box size and start along one axis (of ``axes``): the smallest size of
    :func:`ladder` that holds ``[lo, hi)`` from the aligned start at or before ``lo``
    (or from the start flush with the far border).

    Example:
        >>> sizes, starts = place_segments(torch.tensor([0, 5, 30]), torch.tensor([3, 12, 40]), 40, 2)
        >>> sizes.tolist(), starts.tolist()
        ([4, 9, 14], [0, 5, 26])
    """
    size = torch.full_like(lo, -1)
    start = torch.zeros_like(lo)
    for b in ladder(extent):
        step = alignment(b, extent, axes)
        s = torch.clamp(lo // step * step, max=extent - b)
        fits = (size < 0) & (s + b >= hi)
        size = torch.where(fits, b, size)
        start = torch.where(fits, s, start)
    return size, start


def segment_boxes(inverse: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``(lo, hi)``, int64 ``(count, N)``: each segment's bounding box (over all channels)
    from ``inverse``, ``(C or 1, *spatial)`` segment indices ``0..count-1``."""
    flat = inverse.reshape(-1)
    lo, hi = [], []
    for d in range(inverse.dim() - 1):
        shape = [1] * inverse.dim()
        shape[d + 1] = inverse.shape[d + 1]
        coord = torch.arange(inverse.shape[d + 1]).view(shape).expand(inverse.shape).reshape(-1)
        lo.append(torch.full((count,), 1 << 62).scatter_reduce(0, flat, coord, "amin"))
        hi.append(torch.full((count,), -1).scatter_reduce(0, flat, coord, "amax") + 1)
    return torch.stack(lo, 1), torch.stack(hi, 1)


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s graph over the same modules and parameters (annotations of its
    own: the build's graph keeps those of its grid)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def _bucket_program(ex: Explainer, build: Build, sizes: tuple[int, ...], baseline_image: bool
                    ) -> IncrementalProgram:
    """The program of boxes of ``sizes`` over their aligned grid (row-major), made once per
    build and sizes (and baseline kind)."""
    key = ("segments", sizes, baseline_image)
    program = build.programs.get(key)
    if program is not None:
        return program
    s = ex.settings
    axes = [grid_starts(n, b, len(sizes)) for n, b in zip(s.image_size, sizes)]
    starts = tuple(t.reshape(-1) for t in torch.meshgrid(*axes, indexing="ij"))
    gm = _graph_copy(build.graph_module)
    example = torch.zeros(1, ex.channels, *s.image_size, dtype=build.dtype, device=s.device)
    annotate(gm, example, sizes, starts, tau=s.tau, what=type(ex.model).__name__)
    cut = _head(build)[0]
    if cut is not None and next(n for n in gm.graph.nodes if n.name == cut).meta[META_KEY].state is not DENSE:
        cut = None  # (never seen: a node dense for the build's patch is dense for any larger box)
    fill = PatchFill(image_color=not baseline_image, segments=True, baseline_image=baseline_image)
    program = rewrite(gm, backend=s.backend, color=build.color, fill=fill, shared_weights=build.program, cut=cut)
    program.module.to(s.device)
    program.cut = cut  # what the program returns: the value of this node, or the model's output (None)
    build.programs[key] = program
    logger.debug("segment bucket %s: %d grid positions", sizes, starts[0].numel())
    return program


def _head(build: Build) -> tuple[Optional[str], Optional[fx.GraphModule]]:
    """The *head* of the build's model: the first dense node after which nothing reads an
    earlier node that depends on the image (global pooling, say), and the graph from its
    value to the output. The buckets' programs stop there, and the head runs once over all
    their rows in full batches (a classifier's large linear layers read their weights once
    a batch, not once a bucket). ``(None, None)`` where there is no such node."""
    key = ("head",)
    if key not in build.programs:
        nodes = list(build.graph_module.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        live = lambda m: m.meta.get(META_KEY) is not None and m.meta[META_KEY].state is not CLEAN  # noqa: E731
        earliest_read = len(nodes)  # the earliest image-dependent node read after position i
        cut = None
        for i in range(len(nodes) - 1, -1, -1):
            n = nodes[i]
            info = n.meta.get(META_KEY)
            if (earliest_read >= i and n.op not in ("placeholder", "output", "get_attr") and info is not None
                    and info.state is DENSE):
                cut = n
            earliest_read = min([earliest_read] + [index[p] for p in n.all_input_nodes if live(p)])
        build.programs[key] = (cut.name, _head_module(build.graph_module, cut)) if cut is not None else (None, None)
    return build.programs[key]


def _head_module(gm: fx.GraphModule, cut: fx.Node) -> fx.GraphModule:
    """``forward(cut value) -> output``: the nodes of ``gm`` after ``cut`` (and the constants they read)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n is cut:
            env[n] = graph.placeholder("cut")
        elif n.op == "output":
            graph.output(fx.map_arg(n.args[0], lambda m: env[m]))
        elif n.op != "placeholder" and all(m in env for m in n.all_input_nodes):
            env[n] = graph.node_copy(n, lambda m: env[m])
    head = fx.GraphModule(gm, graph, class_name="KryptonHead")
    head.graph.eliminate_dead_code()
    head.recompile()
    return head


def _capture(build: Build, nodes: tuple[str, ...]) -> fx.GraphModule:
    """The capture graph returning ``nodes`` (by name), made once per build and set."""
    key = ("capture", nodes)
    capture = build.programs.get(key)
    if capture is None:
        by_name = {n.name: n for n in build.graph_module.graph.nodes}
        capture = build.programs[key] = build_capture_module(build.graph_module, [by_name[m] for m in nodes])
    return capture


def _segments(segments, channels: int, spatial: tuple[int, ...]) -> Tensor:
    """``segments`` as int64 ``(1 or C, *spatial)`` on the CPU, checked."""
    if not isinstance(segments, Tensor):
        try:
            segments = torch.as_tensor(segments)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"segments must be a tensor or array of integer ids, got {type(segments).__name__}") \
                from None
    if segments.is_floating_point() or segments.is_complex() or segments.dtype == torch.bool:
        raise TypeError(f"segments must hold integer ids, got {str(segments.dtype)[6:]}; "
                        "give a label map (segments.long() if the values are whole numbers)")
    if segments.dim() == len(spatial):
        segments = segments.unsqueeze(0)
    if segments.dim() == len(spatial) + 2 and segments.shape[0] == 1:
        segments = segments[0]
    if tuple(segments.shape[1:]) != spatial or segments.shape[0] not in (1, channels):
        raise ValueError(f"segments must have shape {spatial}, (1, *{spatial}) or ({channels}, *{spatial}) "
                         f"(per channel), got {tuple(segments.shape)}")
    return segments.to("cpu", torch.int64)


def _baseline(baseline: Baseline, chw: tuple[int, ...], dtype: torch.dtype, device) -> Union[Tensor, float]:
    """A number, or a ``(1, C, *spatial)`` image of the model's dtype (broadcast), checked."""
    if isinstance(baseline, Tensor) and baseline.numel() != 1:
        try:
            image = torch.broadcast_to(baseline, chw)
        except RuntimeError:
            raise ValueError(f"baseline must be a number or a tensor broadcastable to the image {chw}, got "
                             f"shape {tuple(baseline.shape)}") from None
        if not baseline.is_floating_point() or not bool(torch.isfinite(baseline).all()):
            raise ValueError("baseline must hold finite floating-point values")
        return image.to(device, dtype).unsqueeze(0)
    try:
        value = float(baseline)
    except (TypeError, ValueError):
        raise TypeError(f"baseline must be a number or a tensor, got {type(baseline).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"baseline must be finite, got {value}")
    return value


def ablate(ex: Explainer, image: Tensor, segments, baseline: Baseline = 0.0, label: Optional[int] = None,
           batch_size: Optional[int] = None, progress: bool = False) -> SegmentResult:
    """Feature ablation: the output with each segment of ``segments`` replaced by ``baseline``,
    exact (``tau=1``) and incremental; patch and stride play no part. :meth:`Explainer.ablate`
    calls it in ``ex``'s lock and eval mode.

    Args:
        ex: the explainer.
        image: ``(C, *spatial)`` or ``(1, C, *spatial)``, preprocessed for the model.
        segments: integer label map ``(*spatial)`` or ``(1, *spatial)`` (one segment
            per id, any ids, a segment may be in pieces), or ``(C, *spatial)`` per channel.
        baseline: what an ablated element becomes: a number, or a tensor broadcastable
            to the image (a per-pixel baseline image).
        label: the class to record; defaults to the unablated prediction.
        batch_size: segments per batch; defaults to the compiled one.
        progress: show a progress bar (per box size).

    Returns:
        A :class:`~krypton_fx.results.SegmentResult`: ``scores`` per id (ascending
        ``ids``), ``heatmap`` painted back on the mask, ``label``, ``base_prob``.

    Example:
        >>> import krypton_fx, torchvision
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> ex = krypton_fx.compile(model, patch=1, stride=32, image_size=(32, 32))
        >>> image = torch.rand(3, 32, 32)
        >>> segments = torch.arange(32 * 32).view(32, 32) // 256  # 4 bands
        >>> res = ex.ablate(image, segments, baseline=0.5)
        >>> ablated = torch.where(segments == 2, 0.5, image)
        >>> ref = torch.softmax(model(ablated[None]), 1)[0, res.label]
        >>> res.scores.shape, bool(torch.isclose(res.scores[2], ref, atol=1e-5))
        (torch.Size([4]), True)
    """
    start = time.perf_counter()
    if ex.settings.target is not None or ex.settings.norm_stats != "exact":
        raise ValueError("ablate explains a classifier's class with exact statistics; compile the model "
                         "without target= and norm_stats= to ablate segments")
    dtype = common.model_dtype(ex.model)
    batch_size = common.batch_size(batch_size)
    nd = ex.spatial_dims
    x = common.image_batch(image, ex.image_chw if ex.channels is not None else None, dtype, nd).to(ex.device)
    labels = _segments(segments, x.shape[1], tuple(ex.settings.image_size))
    if ex.channels is None or not ex.current_build(x).verified:  # compiles, checks the model, sets channels
        ex.prepare_all([x])
    build = ex.current_build()
    chw = ex.image_chw
    base_value = _baseline(baseline, chw, dtype, ex.device)
    ids, inverse = torch.unique(labels, return_inverse=True)
    lo, hi = segment_boxes(inverse, len(ids))
    placed = [place_segments(lo[:, d], hi[:, d], n, nd) for d, n in enumerate(ex.settings.image_size)]
    sizes = torch.stack([p[0] for p in placed], 1)
    begins = torch.stack([p[1] for p in placed], 1)
    tensor_baseline = isinstance(base_value, Tensor)
    buckets = {tuple(row): [] for row in sizes.tolist()}
    for k, row in enumerate(sizes.tolist()):
        buckets[tuple(row)].append(k)
    programs = {key: _bucket_program(ex, build, key, tensor_baseline) for key in sorted(buckets)}
    build.program.refresh_weights()  # (the bucket programs share its weight copies)
    nodes = tuple(sorted({spec.node for p in programs.values() for spec in p.stored}))
    logits, raw = _capture(build, nodes)(x)
    if not build.verified:
        check_same_output(ex.model, x, logits)
        build.verified = True
    raw_by_node = dict(zip(nodes, raw))
    classes = logits.shape[-1]
    picked = common.label_index(label, classes)
    picked = int(logits.argmax(1)) if picked is None else picked
    base = float(common.scores(logits, picked, ex.output))
    per_element = inverse.expand(chw).unsqueeze(0).to(ex.device)
    color = common.color_values(0.0 if tensor_baseline else base_value, chw[0], dtype).to(ex.device)
    scores = torch.empty(len(ids), dtype=torch.float32)
    score = lambda out, rows: common.scores(out, picked, ex.output)  # noqa: E731
    padded: dict = {}  # (node, pad, fill) -> the prepared map: buckets mostly pad a node alike
    cut_rows, cut_values = [], []
    with common.progress_bar(len(programs), progress, "krypton_fx segments", unit="bucket") as bar:
        for key, members in buckets.items():
            program = programs[key]
            inputs = _program_inputs(program, raw_by_node, per_element, color, base_value, padded)
            program.refresh_weights()
            members_t = torch.tensor(members, dtype=torch.int64)
            rows = members_t * _grid_size(ex, key) + _grid_index(ex, key, begins[members_t])
            if program.cut is None:
                scores[members_t] = ex.run_program(rows, inputs, score, batch_size, program=program)
            else:  # the value at the cut, for the head
                cut_values.append(ex.run_program(rows, inputs, lambda out, rows: out, batch_size, program=program))
                cut_rows.append(members_t)
            bar.update(1)
    if cut_rows:
        head = _head(build)[1]
        values, members_t = torch.cat(cut_values), torch.cat(cut_rows)
        batch = ex.batch_for(batch_size)
        scores[members_t] = torch.cat([score(head(values[lo:lo + batch].to(ex.device)), None).cpu()
                                       for lo in range(0, len(values), batch)])
    bucket_area = sizes.prod(1).double()
    waste = float(bucket_area.sum() / (hi - lo).prod(1).double().sum())
    heatmap = scores[inverse]
    if heatmap.shape[0] == 1:
        heatmap = heatmap[0]
    batch = min(ex.batch_for(batch_size), len(ids))
    return SegmentResult(scores, ids, heatmap, picked, base, ex.output,
                         RunStats(len(ids), batch, seconds=time.perf_counter() - start), len(programs), waste)


def _grid_size(ex: Explainer, sizes: tuple[int, ...]) -> int:
    return math.prod(len(grid_starts(n, b, len(sizes))) for n, b in zip(ex.settings.image_size, sizes))


def _grid_index(ex: Explainer, sizes: tuple[int, ...], begins: Tensor) -> Tensor:
    """Row-major grid position of each ``(N,)`` start of ``begins`` in the grid of ``sizes``."""
    index = torch.zeros(len(begins), dtype=torch.int64)
    for d, (n, b) in enumerate(zip(ex.settings.image_size, sizes)):
        axis = grid_starts(n, b, len(sizes))
        index = index * len(axis) + torch.searchsorted(axis, begins[:, d].contiguous())
    return index


def _program_inputs(program: IncrementalProgram, raw: dict[str, Tensor], per_element: Tensor, color: Tensor,
                    baseline: Union[Tensor, float], padded: dict) -> list[Tensor]:
    """A bucket program's stored activations, padded as it reads them, and its per-image inputs
    (``padded``: what earlier buckets of the image prepared, by node, padding and fill)."""
    def prepare(spec: StoredSpec, value: Tensor, what: str) -> Tensor:
        key = (what, spec.node, spec.pad, spec.fill)
        if key not in padded:
            padded[key] = spec.prepare(value)
        return padded[key]

    stored = [prepare(spec, raw[spec.node], "stored") for spec in program.stored]
    extra = []
    for name, index in program.inputs:
        if name == "occlusion_color":
            extra.append(color)
            continue
        like = StoredSpec(program.stored[index].node, program.stored[index].pad, 0.0)  # padded as the image
        extra.append(prepare(like, per_element if name == "segment_ids" else baseline, name))
    return stored + extra
