"""Several images' positions in one batch (issue 15): a packed program reads each row's
own image out of maps stacked along the first spatial axis, and ``run_many`` gives one
call's maps bit for bit, on the CPU and with CUDA graphs, or goes one image at a time."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import RandomNet, dag_model, occlusion_settings, random_cnns
from test_cold_start import _FakeGraph
from torch import nn

import krypton_fx
from krypton_fx import packing
from krypton_fx import runner as runner_module
from krypton_fx.passes.rewrite import Packing, PatchFill, channels_last, rewrite


def _conv_net(axes: int) -> nn.Module:
    """Conv, pool, conv and a global pool (a projection) over 1 or 3 spatial axes."""
    conv, pool = {1: (nn.Conv1d, nn.MaxPool1d), 3: (nn.Conv3d, nn.MaxPool3d)}[axes]
    torch.manual_seed(0)
    return nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), pool(2), conv(4, 4, 3, padding=1),
                         nn.Flatten(2), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


CASES = {  # model, channels, image size, patch, stride
    "dag": (dag_model, 3, (21, 19), (5, 4), (4, 3)),
    "resnet18": (lambda: _seeded(lambda: __import__("torchvision").models.resnet18(num_classes=4)), 3,
                 (32, 32), 8, 8),
    "signal": (lambda: _conv_net(1), 2, (40,), 6, 5),
    "volume": (lambda: _conv_net(3), 2, (10, 9, 8), 4, 3),
}


def _seeded(make):
    torch.manual_seed(0)
    return make().eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_packed_program_reads_each_rows_own_image(case):
    make, channels, size, patch, stride = CASES[case]
    _assert_packed_rows_exact(make(), channels, size, patch, stride, 0.0, case)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], max_examples=15)
@given(net=random_cnns(max_blocks=4), dims=st.sampled_from([1, 2, 3]), data=st.data(),
       seed=st.integers(0, 2**16))
def test_packed_random_dags_read_each_rows_own_image(net, dims, data, seed):
    blocks, channels = net
    size, patch, stride, color = data.draw(occlusion_settings(channels, dims))
    torch.manual_seed(seed)
    model = RandomNet(blocks, channels, dims=dims).eval()
    try:
        model(torch.randn(1, channels, *size))
    except RuntimeError:
        assume(False)  # the drawn layers shrink the map below one element
    _assert_packed_rows_exact(model, channels, size, patch, stride, color, f"{dims}-d")


def _assert_packed_rows_exact(model, channels, size, patch, stride, color, case):
    """Three images' stored maps stacked, their rows shuffled through the packed program: each
    row equals the plain program's output for its image, bit for bit, at the same batch size."""
    ex = krypton_fx.compile(model, patch=patch, stride=stride, image_size=size, channels=channels,
                            color=color, cache=False)
    images = torch.randn(3, channels, *size, generator=torch.Generator().manual_seed(1))
    stored = [ex.prepare(x)[1] for x in images]
    build, count = ex.current_build(), ex.positions
    program = rewrite(build.graph_module, color=build.color, packing=Packing(count, build.spatial))
    stacks = [torch.cat([s[i] for s in stored], 2).contiguous(memory_format=channels_last(len(size)))
              for i in range(len(stored[0]))]
    rows = torch.randperm(3 * count, generator=torch.Generator().manual_seed(2))  # images interleaved
    packed = program.module(rows, *stacks)
    for k in range(3):  # each image's rows, at the same batch size, through the plain program
        mine = rows // count == k
        positions = torch.where(mine, rows % count, rows[mine][0] % count)
        alone = ex.program.module(positions, *stored[k])[mine]
        assert torch.equal(packed[mine], alone), case


def test_a_packed_program_takes_no_per_image_fill_inputs():
    ex = krypton_fx.compile(dag_model(), patch=(5, 4), stride=(4, 3), image_size=(21, 19), cache=False)
    ex.prepare(torch.zeros(3, 21, 19))
    build = ex.current_build()
    with pytest.raises(ValueError, match="per-image fill inputs"):
        rewrite(build.graph_module, color=build.color, fill=PatchFill(scaled=True),
                packing=Packing(ex.positions, build.spatial))


@pytest.fixture
def graphed(monkeypatch):
    """A DAG explainer whose batches run at one size, as with CUDA graphs (a stand-in)."""
    import krypton_fx.cuda_graphs

    monkeypatch.setattr(krypton_fx.cuda_graphs, "GraphedBatch", _FakeGraph)
    _FakeGraph.captured = []
    ex = krypton_fx.compile(dag_model(), patch=(5, 4), stride=(4, 3), image_size=(21, 19), cache=False,
                            batch_size=64)  # 30 positions an image
    ex.settings = dataclasses.replace(ex.settings, cuda_graphs=True)
    ex.runner.cuda_graphs = True
    return ex


IMAGES = torch.randn(5, 3, 21, 19, generator=torch.Generator().manual_seed(3))
LABELS = [None, 1, None, 0, 2]


def test_run_many_packs_images_and_gives_one_calls_maps_bit_for_bit(graphed, monkeypatch):
    ex = graphed
    monkeypatch.setattr(runner_module, "CAPTURE_AFTER", 2)  # captured from the second pack on
    # A budget of two images' stored maps a pack: packs of 2, 2 and a short 1 (padded).
    one_image = sum(t.numel() * t.element_size() for t in ex.prepare(IMAGES[0])[1])
    monkeypatch.setattr(packing, "_CPU_BUDGET", 2 * one_image + 1)
    seen = []
    real_run_pack = packing._run_pack
    monkeypatch.setattr(packing, "_run_pack", lambda ex, prepared, *a: seen.append(len(prepared))
                        or real_run_pack(ex, prepared, *a))
    many = ex.run_many(IMAGES, LABELS)
    assert seen == [2, 2, 1] and ex._build.packed is not None and ex._build.packs_checked and not ex._build.pack_failed
    for x, label, got in zip(IMAGES, LABELS, many):
        want = ex(x, label=label)
        assert (got.label, got.base_prob) == (want.label, want.base_prob)
        assert torch.equal(got.heatmap, want.heatmap)
    naive = krypton_fx.naive_occlusion(ex.model, IMAGES[1], (5, 4), (4, 3), label=1)
    torch.testing.assert_close(many[1].heatmap, naive.heatmap, atol=1e-5, rtol=0)
    # captured once for the packed program: the short last pack kept the stacks' shapes
    packed = ex._build.packed.module
    assert [key[1] for key in ex.runner._graphs if key[0] is packed] == [64]


def _cpu_dag(batch_size: int = 64):
    """The DAG explainer on the CPU: 30 positions an image, so a batch of 64 holds two images."""
    return krypton_fx.compile(dag_model(), patch=(5, 4), stride=(4, 3), image_size=(21, 19), cache=False,
                              batch_size=batch_size)


def _batch_sizes(module: nn.Module) -> list[int]:
    sizes: list[int] = []
    module.register_forward_pre_hook(lambda mod, args: sizes.append(len(args[0])))
    return sizes


def test_on_the_cpu_a_pack_is_one_batch_of_one_size_with_one_calls_bits():
    """Without CUDA graphs a pack is the images that fit one batch (two here), so every packed
    row runs in a batch of 60; the fifth image, a short pack, runs as one call."""
    ex = _cpu_dag()
    many = ex.run_many(IMAGES[:1], LABELS[:1])  # one image: nothing to pack
    assert ex._build.packed is None
    packed_sizes = _batch_sizes(packing.packed_program(ex).module)
    alone_sizes = _batch_sizes(ex._build.program.module)
    many = ex.run_many(IMAGES, LABELS)
    # the two packs, then the check's first and last image of the first pack, then the fifth image
    assert packed_sizes == [60, 60] and alone_sizes == [30, 30, 30]
    assert ex._build.packs_checked and not ex._build.pack_failed
    for x, label, got in zip(IMAGES, LABELS, many):
        want = ex(x, label=label)
        assert (got.label, got.base_prob) == (want.label, want.base_prob)
        assert torch.equal(got.heatmap, want.heatmap)


def test_on_the_cpu_a_short_pack_is_checked_at_its_own_size():
    ex = _cpu_dag(batch_size=128)  # four images a pack
    alone_sizes = _batch_sizes(ex.current_build().program.module)
    assert packing.pack_batch(ex, 3, None) == 128 and packing.pack_batch(ex, 4, 50) is None  # one a batch
    for images, checks in ((IMAGES, 2 + 1), (IMAGES[:3], 2), (IMAGES[1:4], 0)):  # (+1: the fifth image)
        alone_sizes.clear()
        many = ex.run_many(images)
        assert len(alone_sizes) == checks and ex._build.packs_checked and not ex._build.pack_failed
        assert all(torch.equal(got.heatmap, ex(x).heatmap) for x, got in zip(images, many))
    assert ex._build.packs_checked == {4: True, 3: True}


def test_on_the_cpu_a_pack_runs_up_to_sixteen_images_by_default():
    """The explainer's default batch is sized for one image's windows; a pack's is larger."""
    ex = krypton_fx.compile(dag_model(), patch=(5, 4), stride=(4, 3), image_size=(21, 19), cache=False)
    assert ex.batch_size < 16 * 30 and packing.pack_batch(ex, 20, None) == 16 * 30
    assert packing.pack_batch(ex, 20, 64) == 64  # a batch the caller asks for is kept
    images = torch.randn(17, 3, 21, 19, generator=torch.Generator().manual_seed(4))
    packed_sizes = _batch_sizes(packing.packed_program(ex).module)
    many = ex.run_many(images)
    assert packed_sizes == [16 * 30]  # and the 17th image alone
    assert all(torch.equal(got.heatmap, ex(x).heatmap) for x, got in zip(images, many))


@pytest.mark.parametrize("device", ["cuda graphs", "cpu"])
def test_a_pack_that_differs_from_one_call_falls_back_to_one_image_at_a_time(graphed, device, monkeypatch,
                                                                             caplog):
    ex = graphed if device == "cuda graphs" else _cpu_dag()
    caplog.set_level(logging.INFO, logger=packing.__name__)  # a warning with graphs, news on the CPU
    real = packing.packed_program

    def rounded_otherwise(ex):  # a library that rounds a packed batch differently
        program = real(ex)
        forward = program.module.forward
        program.module.forward = lambda *a: forward(*a) * (1 + 1e-6)
        return program
    monkeypatch.setattr(packing, "packed_program", rounded_otherwise)
    many = ex.run_many(IMAGES, LABELS)
    assert ex._build.pack_failed and "one image at a time" in caplog.text
    assert caplog.records[-1].levelno == (logging.WARNING if device == "cuda graphs" else logging.INFO)
    for x, label, got in zip(IMAGES, LABELS, many):
        assert torch.equal(got.heatmap, ex(x, label=label).heatmap)
    assert packing.pack_batch(ex, 5, None) is None  # and no more packs for this build


def test_the_check_reads_the_last_image_of_the_pack_too(monkeypatch):
    """A library whose blocks round a batch's tail rows otherwise: only the last image differs."""
    ex = _cpu_dag(batch_size=96)  # three images a pack
    real = packing.packed_program

    def tail_rounded_otherwise(ex):
        program = real(ex)
        forward = program.module.forward

        def run(positions, *stored):
            out = forward(positions, *stored).clone()
            out[positions >= 2 * ex.positions] *= 1 + 1e-6
            return out
        program.module.forward = run
        return program
    monkeypatch.setattr(packing, "packed_program", tail_rounded_otherwise)
    many = ex.run_many(IMAGES[:3])
    assert ex._build.pack_failed
    assert all(torch.equal(got.heatmap, ex(x).heatmap) for x, got in zip(IMAGES, many))


def test_pack_true_runs_a_packs_unoccluded_passes_as_one_batch():
    ex = _cpu_dag(batch_size=96)  # three images a pack: the first alone (it may compile), then two
    capture_sizes = _batch_sizes(ex.current_build().program.capture)
    many = ex.run_many(IMAGES, LABELS, pack=True)
    assert capture_sizes == [1, 2, 2]
    for x, label, got in zip(IMAGES, LABELS, many):
        want = ex(x, label=label)
        assert got.label == want.label and got.base_prob == pytest.approx(want.base_prob, abs=1e-6)
        torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-6, rtol=0)


def test_with_graphs_every_batch_runs_at_the_graphs_size(graphed, monkeypatch):
    """Before a capture too, a short batch is padded: the same rounding either way."""
    monkeypatch.setattr(runner_module, "CAPTURE_AFTER", 1000)  # never captured here
    sizes = []
    graphed.program.module.register_forward_pre_hook(lambda mod, args: sizes.append(len(args[0])))
    res = graphed(IMAGES[0], batch_size=8)  # 30 positions: 8, 8, 8 and 6 padded to 8
    assert sizes == [8, 8, 8, 8] and _FakeGraph.captured == []
    torch.testing.assert_close(res.heatmap, krypton_fx.naive_occlusion(
        graphed.model, IMAGES[0], (5, 4), (4, 3)).heatmap, atol=1e-5, rtol=0)
