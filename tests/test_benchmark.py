"""krypton_fx.benchmark: both sides timed without autograd (a naive forward that records its
graph runs slower and would flatter the speedup), on the same positions, with equal scores."""

import torch
from torch import nn

from krypton_fx import benchmark


class Recorder(nn.Module):
    """A small CNN that notes whether each forward ran with grad enabled."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 3))
        self.grad_modes = []

    def forward(self, x):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.body(x)


def test_measure_runs_both_sides_without_grad_and_agrees():
    torch.manual_seed(0)
    model = Recorder()
    m = benchmark.measure(model, torch.rand(3, 20, 20), patch=6, stride=4, batch_size=4, positions=8)
    assert model.grad_modes and not any(model.grad_modes)
    assert m.max_abs_diff <= 1e-5 and m.theoretical > 1


def test_side_by_side_runs_without_grad():
    first, second, *_ = benchmark.side_by_side(torch.is_grad_enabled, torch.is_grad_enabled)
    assert (first, second) == (False, False)
