"""Side-by-side measurement of naive and incremental occlusion.

Used by ``bench/speed.py`` and ``krypton-fx bench``: both runs use the same
positions and batch size, in one process, one after the other; the ratio of
their wall-clock times is the measured speedup. Peak memory is the CUDA
allocator's peak of each run; on the CPU it is not measured (None): the
process's resident peak does not fall between two runs in one process.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import common
from . import geometry as geo
from .explainer import Explainer
from .explainer import compile as compile_explainer
from .ops import occlude_window
from .passes.rewrite import channels_last
from .report import conv_macs, theoretical_speedup
from .tiered import wait_for_kernels
from .tracing import eval_mode

__all__ = ["Measurement", "measure", "reset_peak_memory", "peak_memory", "time_breakdown"]


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> Optional[int]:
    """Peak bytes allocated since :func:`reset_peak_memory`; None where not measured (the CPU).

    On the CPU the resident-set peak (VmHWM) cannot be used per phase: freed
    memory stays resident, so the second run would report the first one's peak.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return None


@dataclasses.dataclass
class Measurement:
    """One side-by-side run.

    Attributes:
        positions: occlusion positions timed (the same for both).
        batch_size: positions per batch (the same for both).
        naive_s: seconds of naive batched inference.
        incremental_s: seconds of the incremental graph.
        speedup: ``naive_s / incremental_s``.
        theoretical: eqs. 16-20 at the image centre.
        executed_ratio: conv multiply-adds of a full inference over those the
            incremental graph executes per position.
        naive_peak: peak memory of the naive run, bytes (None: not measured, the CPU).
        incremental_peak: peak memory of the incremental run, bytes (None: not measured).
        max_abs_diff: largest difference of the two score vectors.
    """

    positions: int
    batch_size: int
    naive_s: float
    incremental_s: float
    speedup: float
    theoretical: float
    executed_ratio: float
    naive_peak: Optional[int]
    incremental_peak: Optional[int]
    max_abs_diff: float


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, NaN only where exactly one side is NaN (fp16 overflow on both sides agrees)."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return float(torch.where(both_nan, 0.0, (a - b).abs()).max()) if a.numel() else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def split_breakdown(cats: dict[str, float]) -> tuple[dict[str, float], str]:
    """A :func:`time_breakdown` as ``(seconds per category without the total, "conv 10%,
    gather 24%, ...")``: the benches' row and printed line."""
    total = cats.get("total") or 1.0
    seconds = {k: v for k, v in cats.items() if k != "total"}
    return seconds, ", ".join(f"{k} {v / total:.0%}" for k, v in seconds.items())


@torch.no_grad()
def side_by_side(naive: Callable[[], Any], incremental: Callable[[], Any]) -> tuple[Any, Any, float, float]:
    """Run ``naive()`` then ``incremental()`` once each: ``(naive's result, incremental's,
    naive seconds, incremental seconds)`` (the demos' per-image rows)."""
    t0 = time.perf_counter()
    first = naive()
    t1 = time.perf_counter()
    second = incremental()
    return first, second, t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def measure(model: nn.Module, image: torch.Tensor, patch=16, stride=4, batch_size: int = 32,
            positions: Optional[int] = None, device="cpu", channels_last_naive: bool = False,
            explainer: Optional[Explainer] = None, backend: str = "auto", tau: float = 1.0,
            warmup: bool = True) -> Measurement:
    """Time naive vs incremental occlusion on the same positions and batch size.

    Args:
        model: the classifier.
        image: ``(C, H, W)`` model-ready image.
        positions: time only this many positions around the image centre
            (None: all).
        channels_last_naive: run the naive baseline channels-last (faster on
            some CPUs: report the better of the two).
        explainer: reuse a compiled explainer (compiled here otherwise).
    """
    device = torch.device(device)
    model = model.to(device).eval()
    image = image.to(device)
    size = tuple(image.shape[1:])  # (C, *spatial) -> the spatial size
    ex = explainer or compile_explainer(model, patch=patch, stride=stride, image_size=size,
                                        batch_size=batch_size, device=device, backend=backend, tau=tau,
                                        channels=image.shape[0])
    total = ex.positions
    count = total if positions is None else min(positions, total)
    start = max(0, total // 2 - count // 2)
    pos = torch.arange(start, start + count)
    *starts, _ = geo.occlusion_grid(size, ex.patch, ex.stride)
    table = torch.stack([torch.zeros_like(s) for s in starts] + starts, 1)[pos].to(device)
    fmt = channels_last(len(size)) if channels_last_naive else torch.contiguous_format
    # A converted copy: converting in place would swap the parameters under
    # the explainer (and any CUDA graph it captured).
    naive_model = copy.deepcopy(model).to(memory_format=fmt) if channels_last_naive else model

    with eval_mode(model):
        logits, stored = ex.prepare(image)
        label = int(logits.argmax(1))

        def run_naive(idx: slice) -> torch.Tensor:
            x = occlude_window(image[None], ex.color, table[idx], size, ex.patch, backend=backend)
            return common.scores(naive_model(x.contiguous(memory_format=fmt)), label, ex.output)

        if warmup:
            run_naive(slice(0, batch_size))
            ex.run_positions(pos[:batch_size], stored, label, batch_size)
            wait_for_kernels()  # time the kernels, not the torch ops that stand in while they compile
            _sync(device)
        reset_peak_memory(device)
        t0 = time.perf_counter()
        naive = torch.cat([run_naive(slice(lo, lo + batch_size)).cpu() for lo in range(0, count, batch_size)])
        _sync(device)
        naive_s = time.perf_counter() - t0
        naive_peak = peak_memory(device)

        reset_peak_memory(device)
        t0 = time.perf_counter()
        inc = ex.run_positions(pos, stored, label, batch_size)
        _sync(device)
        inc_s = time.perf_counter() - t0
        inc_peak = peak_memory(device)
    full, executed = conv_macs(ex.graph_module)
    return Measurement(count, batch_size, naive_s, inc_s, naive_s / inc_s,
                       theoretical_speedup(model, size, ex.patch, tau=ex.tau, channels=image.shape[0]),
                       full / max(executed, 1), naive_peak, inc_peak, _max_abs_diff(naive, inc))


_CONV_KERNELS = ("aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_convolution_mode",
                 "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::slow_conv3d_forward",
                 "aten::convolution_overrideable", "aten::_nnpack_spatial_convolution")


def time_breakdown(ex: Explainer, image: torch.Tensor, positions: int, batch_size: int,
                   inputs: Optional[list] = None, keep=None) -> dict[str, float]:
    """Seconds per category (conv, gather, projection, occlusion, resample, other, total) of one
    incremental run over ``positions`` centre positions, from torch's profiler.

    ``conv`` counts the convolution kernels and the 1x1x1 convolutions the
    incremental graph runs as matrix products (``krypton::pointwise_conv``).
    ``inputs`` and ``keep``: the graph's inputs and what to keep of a batch (a
    segmentation target's, :meth:`Explainer.resolve`), instead of class 0's score.
    """
    from torch.profiler import ProfilerActivity, profile

    stored = inputs if inputs is not None else ex.prepare(image)[1]
    pos = torch.arange(positions) + max(0, ex.positions // 2 - positions // 2)
    cuda = image.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if keep is not None:
            ex.run_program(pos, stored, keep, batch_size)
        else:
            ex.run_positions(pos, stored, 0, batch_size)
    cats = {"conv": 0.0, "gather": 0.0, "projection": 0.0, "occlusion": 0.0, "resample": 0.0}
    total = 0.0
    for evt in prof.key_averages():
        dev_time = getattr(evt, "device_time_total", 0.0) if cuda else 0.0
        if evt.key == "krypton::pointwise_conv":
            cats["conv"] += (dev_time or evt.cpu_time_total) / 1e6
        elif evt.key.startswith("krypton::"):
            cats[evt.key.split("::")[1]] += (dev_time or evt.cpu_time_total) / 1e6
        elif evt.key in _CONV_KERNELS:
            cats["conv"] += (dev_time or evt.self_cpu_time_total) / 1e6
        if not cuda:
            total += evt.self_cpu_time_total / 1e6
    if cuda:
        total = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages()) / 1e6
    cats["other"] = max(0.0, total - sum(cats.values()))
    cats["total"] = total
    return cats
