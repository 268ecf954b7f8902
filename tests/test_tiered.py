"""Tiered execution (issue 16, cold start): a fresh build runs on the torch ops while its
Triton kernels compile in the background, then on the kernels and CUDA graphs, with
the same maps bit for bit.

Triton's interpreter compiles nothing, so these tests stand in for the compile: the
tier is told kernels need compiling, and ``compile_ahead`` returns a future the test
completes. The kernels themselves run in the interpreter."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch
from test_cold_start import _FakeGraph
from torch import nn

import krypton_fx
from krypton_fx import tiered
from krypton_fx.triton_kernels import ahead, gather, occlusion, projection
from krypton_fx.triton_kernels.gather import gather_window_triton

SIZE, PATCH, STRIDE, BATCH = (12, 10), (3, 3), (3, 2), 4  # 16 positions: 4 batches of 4
KERNEL_OPS = {"gather_window", "project_to_full", "occlude_window"}


@pytest.fixture
def tiers(monkeypatch):
    """Kernels that need compiling, a compile the test completes, real launches counted."""
    monkeypatch.setattr(tiered, "jit_compiles", lambda: True)
    state = SimpleNamespace(compiles=[], future=Future(), launches=0)

    def compile_ahead(launches, device):
        state.compiles.append(list(launches))
        return state.future

    def counting_launch(kernel, grid, *args, **kwargs):
        if ahead._RECORDING.get() is None:
            state.launches += 1
        real_launch(kernel, grid, *args, **kwargs)

    real_launch = ahead.launch
    monkeypatch.setattr(ahead, "compile_ahead", compile_ahead)
    for module in (gather, occlusion, projection):
        monkeypatch.setattr(module, "launch_kernel", counting_launch)
    return state


class _Residual(nn.Module):
    """Small enough for the interpreter: an input occlusion, gathers, a residual add and a
    projection at the global pool."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y + self.b(y)
        return self.head(torch.relu(y).mean((2, 3)))


def _explainer(**kwargs) -> krypton_fx.Explainer:
    torch.manual_seed(0)
    return krypton_fx.compile(_Residual().eval(), patch=PATCH, stride=STRIDE, image_size=SIZE,
                              batch_size=BATCH, cache=False, **kwargs)


def _kernel_nodes(ex: krypton_fx.Explainer) -> int:
    return sum(n.op == "call_function" and n.target.__name__ in KERNEL_OPS
               for n in ex.program.module.graph.nodes)


IMAGE = torch.randn(3, *SIZE, generator=torch.Generator().manual_seed(3))


def test_a_fresh_build_runs_on_the_torch_ops_until_its_kernels_are_compiled(tiers):
    ex = _explainer(backend="triton")
    first = ex(IMAGE)
    # One compile, of the launches of one batch, holding no tensor; no kernel launched.
    assert len(tiers.compiles) == 1 and tiers.launches == 0
    recorded, = tiers.compiles
    assert len(recorded) == _kernel_nodes(ex) > 2
    assert not [a for item in recorded for a in item.args if isinstance(a, torch.Tensor)]
    assert {type(a) for item in recorded for a in item.args} >= {ahead.Pointer, int}
    naive = krypton_fx.naive_occlusion(ex.model, IMAGE, PATCH, STRIDE, 0.0, label=first.label)
    torch.testing.assert_close(first.heatmap, naive.heatmap, atol=1e-5, rtol=0)

    again = ex(IMAGE)  # still compiling: the torch ops again, and no second compile
    assert len(tiers.compiles) == 1 and tiers.launches == 0

    waiting = threading.Thread(target=tiered.wait_for_kernels)
    waiting.start()
    waiting.join(timeout=0.2)
    assert waiting.is_alive()  # wait_for_kernels blocks while the compile runs
    tiers.future.set_result(0.5)
    waiting.join(timeout=10)
    assert not waiting.is_alive() and not tiered._in_flight
    warm = ex(IMAGE)
    assert tiers.launches == 4 * _kernel_nodes(ex)  # every batch on the kernels
    assert torch.equal(first.heatmap, warm.heatmap) and torch.equal(again.heatmap, warm.heatmap)


def test_a_call_moves_to_the_kernels_as_soon_as_they_are_compiled(tiers, monkeypatch):
    ex = _explainer(backend="triton")
    torch_map = _explainer(backend="torch")(IMAGE).heatmap
    cold_batches = []
    real_run = tiered.KernelTier.run

    def run(self, module, positions, stored):
        cold_batches.append(len(positions))
        if len(cold_batches) == 2:
            tiers.future.set_result(0.5)  # the compile ends during the second batch
        return real_run(self, module, positions, stored)

    monkeypatch.setattr(tiered.KernelTier, "run", run)
    res = ex(IMAGE)
    assert cold_batches == [BATCH, BATCH] and tiers.launches == 2 * _kernel_nodes(ex)
    assert torch.equal(res.heatmap, torch_map)  # torch ops and kernels agree bit for bit


def test_no_cuda_graph_is_captured_while_the_kernels_compile(tiers, monkeypatch):
    import krypton_fx.cuda_graphs

    monkeypatch.setattr(krypton_fx.cuda_graphs, "GraphedBatch", _FakeGraph)
    _FakeGraph.captured = []
    ex = _explainer(backend="triton")
    ex.settings = dataclasses.replace(ex.settings, cuda_graphs=True)
    ex.runner.cuda_graphs = True
    cold = [ex(IMAGE).heatmap for _ in range(2)]  # 8 batches: a capture would pay
    assert _FakeGraph.captured == [] and tiers.launches == 0
    tiers.future.set_result(0.5)
    warm = ex(IMAGE).heatmap
    assert _FakeGraph.captured == [BATCH]  # (4 more batches: now it is captured)
    assert all(torch.equal(c, warm) for c in cold)


def test_a_failed_compile_leaves_the_kernels_to_compile_on_first_launch(tiers):
    ex = _explainer(backend="triton")
    first = ex(IMAGE)
    tiers.future.set_exception(RuntimeError("ptxas died"))
    second = ex(IMAGE)
    assert tiers.launches == 4 * _kernel_nodes(ex) and torch.equal(first.heatmap, second.heatmap)


def test_nothing_changes_where_no_kernel_compiles(tiers):
    for ex in (_explainer(backend="torch"), _explainer(backend="auto")):  # on the CPU: the torch ops
        ex(IMAGE)
        assert ex._build.tier.ready and not tiers.compiles
    assert not tiered.KernelTier("triton", torch.device("cpu")).ready  # where kernels do compile


def test_the_interpreter_compiles_nothing_and_tiers_can_be_turned_off(monkeypatch):
    assert not tiered.jit_compiles()  # CI runs the kernels in the interpreter (conftest)
    assert tiered.KernelTier("triton", torch.device("cpu")).ready
    monkeypatch.delenv("TRITON_INTERPRET")
    assert tiered.jit_compiles()
    monkeypatch.setenv("KRYPTON_FX_TIERED", "0")
    assert not tiered.jit_compiles() and tiered.KernelTier("triton", torch.device("cpu")).ready


# --- recording and compiling ahead ------------------------------------------------------


class _Kernel:
    """Stands in for a JITFunction: ``kernel[grid](...)`` and ``warmup`` are recorded."""

    def __init__(self, fail: bool = False):
        self.launched, self.warmed, self.fail = [], [], fail

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append((grid, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        if self.fail:
            raise RuntimeError("cannot compile")
        self.warmed.append((threading.current_thread().name, grid, args, kwargs))


def test_recording_replaces_launches_in_its_own_thread_only():
    kernel, x = _Kernel(), torch.zeros(4, dtype=torch.float16)
    other = threading.Thread(target=lambda: ahead.launch(kernel, (2,), x, 3, BLOCK=8))
    with ahead.recording() as launches:
        ahead.launch(kernel, (1,), x, 3, BLOCK=8)
        other.start()
        other.join()
    assert kernel.launched == [((2,), (x, 3), {"BLOCK": 8})]  # the other thread's launch ran
    (k, grid, (pointer, n), kwargs), = launches
    assert (k, grid, n, kwargs) == (kernel, (1,), 3, {"BLOCK": 8})
    assert pointer.data_ptr() == x.data_ptr() and pointer.dtype == torch.float16
    ahead.launch(kernel, (5,), x)
    assert kernel.launched[-1] == ((5,), (x,), {})


def test_recording_a_real_launcher_returns_without_running_it():
    stored = torch.arange(16.0).view(1, 1, 4, 4)
    table = torch.tensor([[1, 1, 0, 0]])
    with ahead.recording() as launches:
        gather_window_triton(stored, None, table, (2, 2))
    (_, grid, args, kwargs), = launches
    assert kwargs["AXES"] == 2 and not kwargs["HAS_PATCH"] and grid[0] >= 1
    assert args[1].data_ptr() == stored.data_ptr()  # the stored map, as an address
    out = gather_window_triton(stored, None, table, (2, 2))
    assert out[0, 0].tolist() == [[5.0, 6.0], [9.0, 10.0]]


def test_compile_ahead_warms_every_launch_in_the_background():
    kernel, x = _Kernel(), torch.zeros(4)
    launches = [ahead.Launch(kernel, (i,), (ahead.Pointer(x), i), {"BLOCK": 4}) for i in range(3)]
    done = ahead.compile_ahead(launches, torch.device("cpu"))
    assert done.result(timeout=60) >= 0
    assert sorted(grid for _, grid, _, _ in kernel.warmed) == [(0,), (1,), (2,)]
    assert all(name.startswith("krypton-fx-compile") for name, *_ in kernel.warmed)
    assert threading.current_thread().name not in {name for name, *_ in kernel.warmed}
    assert kernel.launched == []  # compiled, never launched

    failing = ahead.compile_ahead([ahead.Launch(_Kernel(fail=True), (1,), (), {})], torch.device("cpu"))
    with pytest.raises(RuntimeError, match="cannot compile"):
        failing.result(timeout=60)
