"""Memory: batches sized from the device's free memory, and a batch that runs out of memory
halves itself and goes on, with the same map."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import krypton_fx
from krypton_fx import common


class Budget(nn.Module):
    """Identity that fails like an allocator when a batch is larger than ``limit``."""

    def __init__(self, limit: int, error):
        super().__init__()
        self.limit, self.error, self.sizes = limit, error, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise self.error(x.shape[0])
        return x


def cuda_oom(n):
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} MiB")


def host_oom(n):
    return RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                        f"you tried to allocate {n << 20} bytes")


def net(budget: Budget) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), budget, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


@pytest.mark.parametrize("error", [cuda_oom, host_oom])
def test_a_batch_out_of_memory_halves_and_the_map_is_unchanged(error, caplog):
    budget = Budget(limit=5, error=error)
    model = net(budget)
    image = torch.rand(3, 24, 24)
    ex = krypton_fx.compile(model, patch=6, stride=3, image_size=(24, 24), batch_size=16,
                            leaf_modules=(Budget,), cache=False)
    with caplog.at_level(logging.WARNING, logger="krypton_fx.explainer"):
        res = ex(image)
    ref = krypton_fx.naive_occlusion(model, image, patch=6, stride=3, batch_size=4)
    torch.testing.assert_close(res.heatmap, ref.heatmap, atol=1e-6, rtol=0)
    assert [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()] == [
        f"a batch of 16 positions ran out of memory on cpu ({common.first_line(error(16))}): going on with 8",
        f"a batch of 8 positions ran out of memory on cpu ({common.first_line(error(8))}): going on with 4"]
    assert ex.batch_size == 4 and res.stats["batch_size"] == 4  # later calls start from the batch that fitted
    budget.sizes.clear()
    again = ex(image)
    assert max(budget.sizes[1:]) == 4  # (the first is the unoccluded pass)
    assert torch.equal(again.heatmap, res.heatmap)


def test_one_position_out_of_memory_and_other_errors_are_raised():
    image = torch.rand(3, 24, 24)
    ex = krypton_fx.compile(net(Budget(limit=1, error=cuda_oom)), patch=6, stride=3, image_size=(24, 24),
                            batch_size=4, leaf_modules=(Budget,), cache=False)
    logits, stored = ex.prepare(image)
    ex.model[4].limit = 0
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        ex.run_positions(torch.arange(ex.positions), stored, label=0)

    ex = krypton_fx.compile(net(Budget(limit=1, error=lambda n: RuntimeError("shape mismatch"))), patch=6,
                            stride=3, image_size=(24, 24), batch_size=4, leaf_modules=(Budget,), cache=False)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ex(image)


def test_cpu_batches_come_from_available_memory(monkeypatch):
    monkeypatch.setattr(common, "_available_host_memory", lambda: 3 << 30)
    cpu = torch.device("cpu")
    assert common.default_batch_size(cpu, 100 << 20) == 10  # a third of 3 GiB, 100 MiB a position
    assert common.default_batch_size(cpu, 1) == 256  # the CPU's cap for small positions
    assert common.default_batch_size(cpu, 128 << 10) == 256  # 32 MiB a batch
    assert common.default_batch_size(cpu, 256 << 10) == 128
    assert common.default_batch_size(cpu, 1 << 20) == 64  # at least 64 rows where memory allows
    assert common.default_batch_size(cpu, 4 << 30) == 1  # never below one
    monkeypatch.setattr(common, "_available_host_memory", lambda: 96 << 30)
    assert common.default_batch_size(cpu, 100 << 20) == 20  # 2 GiB at most: the same on every large machine
    monkeypatch.undo()
    assert common._available_host_memory() > 0


def test_only_allocation_failures_count_as_out_of_memory():
    assert common.is_out_of_memory(cuda_oom(1)) and common.is_out_of_memory(host_oom(1))
    assert not common.is_out_of_memory(RuntimeError("shape '[2, 3]' is invalid for input of size 7"))
    assert not common.is_out_of_memory(ValueError("out of memory"))


def test_the_progress_bar_counts_the_smaller_batches(capsys):
    ex = krypton_fx.compile(net(Budget(limit=5, error=cuda_oom)), patch=6, stride=3, image_size=(24, 24),
                            batch_size=16, leaf_modules=(Budget,), cache=False)
    ex(torch.rand(3, 24, 24), progress=True)  # 49 positions: 16 fails, 8 fails, 13 batches of 4
    err = capsys.readouterr().err
    assert "13/13" in err.split("\r")[-1]  # the finished bar counts the batches that ran
