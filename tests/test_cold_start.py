"""Fast from the first call: one compile shared by every caller, one forward extra at most,
CUDA graphs captured only when they pay and never twice for one batch size."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from strategies import dag_model
from torch import nn

import krypton_fx
from krypton_fx import explainer as explainer_module
from krypton_fx import runner as runner_module


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


def test_compile_with_the_same_arguments_reuses_one_explainer(model):
    krypton_fx.clear_cache()
    a = krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40))
    assert krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40)) is a
    assert krypton_fx.compile(model, patch=12, stride=8, image_size=(40, 40)) is not a
    assert krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40), cache=False) is not a
    krypton_fx.clear_cache()
    assert krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40)) is not a


def test_a_cached_explainer_follows_edits_and_replacements(model):
    krypton_fx.clear_cache()
    image = torch.randn(3, 40, 40)
    krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40))(image)
    with torch.no_grad():
        model.layer1[0].conv1.weight.mul_(-2.0)  # edited in place
    again = krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40))(image)
    want = krypton_fx.naive_occlusion(model, image, patch=12, stride=10)
    torch.testing.assert_close(again.heatmap, want.heatmap, atol=1e-5, rtol=0)
    model.fc = nn.Linear(512, 5)  # replaced
    again = krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40))(image)
    want = krypton_fx.naive_occlusion(model, image, patch=12, stride=10)
    torch.testing.assert_close(again.heatmap, want.heatmap, atol=1e-5, rtol=0)


def test_a_second_captum_occlusion_does_not_compile_again(model, monkeypatch):
    from krypton_fx.captum import Occlusion

    krypton_fx.clear_cache()
    made = []
    real_init = explainer_module.Explainer.__init__

    def counting_init(self, *args, **kwargs):
        made.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(explainer_module.Explainer, "__init__", counting_init)
    x = torch.randn(2, 3, 32, 32)
    kw = dict(sliding_window_shapes=(3, 8, 8), strides=(3, 8, 8), target=1)
    first = Occlusion(model).attribute(x, **kw)
    assert len(made) == 1
    second = Occlusion(model).attribute(x, **kw)  # the common pattern: a new object per batch
    assert len(made) == 1
    torch.testing.assert_close(first, second)


def test_the_first_call_costs_one_extra_forward_at_most(model):
    """compile + the first map run the model's layers twice (the unoccluded pass, which
    naive occlusion also runs, and the check that the traced graph reproduces the model)."""
    calls = []
    handle = model.conv1.register_forward_hook(lambda *_: calls.append(1))
    image = torch.randn(3, 40, 40)
    ex = krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40), cache=False)
    assert not calls  # compiling traces only
    ex(image)
    assert len(calls) == 2
    ex(image)
    assert len(calls) == 3  # later images: the unoccluded pass alone
    handle.remove()


class _FakeGraph:
    """Stands in for GraphedBatch on the CPU: counts captures, runs the module padded."""

    captured: list[int] = []

    def __init__(self, module, batch, stored):
        self.module, self.batch = module, batch
        self.shapes = [s.shape for s in stored]  # a real graph's static buffers
        _FakeGraph.captured.append(batch)

    def load(self, stored):
        assert [s.shape for s in stored] == self.shapes, "stored inputs of another shape than captured"
        self.stored = stored

    def __call__(self, positions):
        n = positions.shape[0]
        padded = torch.cat([positions, positions[-1:].expand(self.batch - n)])
        return self.module(padded, *self.stored)[:n]


@pytest.fixture
def graphed_explainer(monkeypatch):
    """A DAG explainer whose batches go through (fake) CUDA graphs."""
    import krypton_fx.cuda_graphs

    monkeypatch.setattr(krypton_fx.cuda_graphs, "GraphedBatch", _FakeGraph)
    _FakeGraph.captured = []
    ex = krypton_fx.compile(dag_model(), patch=(5, 4), stride=(2, 2), image_size=(21, 19), cache=False)
    ex.settings = dataclasses.replace(ex.settings, cuda_graphs=True)
    ex.runner.cuda_graphs = True
    return ex


def test_chunks_of_varying_length_capture_one_graph_per_batch_size(graphed_explainer):
    ex = graphed_explainer
    image = torch.randn(3, 21, 19)
    want = ex(image, batch_size=16).heatmap  # 72 positions: 5 batches of 16, the last padded
    assert _FakeGraph.captured == [16]
    _, stored = ex.prepare(image)
    label = ex(image).label
    scores = []
    for lo, hi in [(0, 7), (7, 30), (30, 31), (31, 60), (60, 72)]:  # Captum-like chunks
        scores.append(ex.run_positions(torch.arange(lo, hi), stored, label, batch_size=16))
    torch.testing.assert_close(torch.cat(scores).view(ex.grid), want)
    assert _FakeGraph.captured == [16]  # reused for every chunk, short or long: never captured again


def test_a_one_off_small_call_runs_without_capturing(graphed_explainer):
    ex = graphed_explainer
    image = torch.randn(3, 21, 19)
    _, stored = ex.prepare(image)
    ex.run_positions(torch.arange(3), stored, 0, batch_size=8)  # one batch: a capture would not pay
    assert _FakeGraph.captured == []
    for _ in range(runner_module.CAPTURE_AFTER):
        ex.run_positions(torch.arange(3), stored, 0, batch_size=8)
    assert _FakeGraph.captured == [8]  # used again and again: now it pays


def test_a_capture_out_of_memory_captures_a_smaller_batch(graphed_explainer, monkeypatch):
    ex = graphed_explainer
    image = torch.randn(3, 21, 19)
    want = ex(image, batch_size=16).heatmap
    _FakeGraph.captured = []
    ex.runner._graphs.clear()
    real_init = _FakeGraph.__init__

    def capture(self, module, batch, stored):
        if batch > 8:
            raise torch.OutOfMemoryError(f"CUDA out of memory capturing a batch of {batch}")
        real_init(self, module, batch, stored)

    monkeypatch.setattr(_FakeGraph, "__init__", capture)
    res = ex(image, batch_size=16)  # 72 positions in 5 batches: 16 fails to capture, 8 is captured
    torch.testing.assert_close(res.heatmap, want, atol=1e-6, rtol=0)
    assert _FakeGraph.captured == [8] and ex.batch_size == 8
