"""The reinplace pass: activations and eval-mode batch norms run in place only on a temporary
that nothing else reads, and the heat map stays naive occlusion's."""

import doctest

import pytest
import torch
from strategies import randomize_batchnorm
from torch import nn

import krypton_fx
from krypton_fx.passes import reinplace
from krypton_fx.passes.norms import frozen_norm, frozen_norm_
from krypton_fx.passes.reinplace import batch_norm_


class Shared(nn.Module):
    """conv -> bn -> relu, a chain nothing else reads (in place); a conv whose output an
    activation and a later add both read, and an activation of the network's input
    (both out of place)."""

    def __init__(self):
        super().__init__()
        self.entry = nn.LeakyReLU(0.2)
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6()
        self.drop = nn.Dropout(0.3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        y = self.act1(self.drop(self.bn1(self.conv1(self.entry(x)))))
        z = self.bn2(self.conv2(y))
        return self.head(self.act2(z) + z)


def _calls(ex) -> dict[str, str]:
    """Each module call of the incremental graph: its type, and whether reinplace made it in place
    (a batch norm: a call of batch_norm_)."""
    gm = ex.program.module
    calls = {n.name: type(gm.get_submodule(n.target)).__name__
             + (" in place" if n.target.startswith("krypton_inplace_") else "")
             for n in gm.graph.nodes if n.op == "call_module"}
    calls.update({n.name: "batch_norm_" for n in gm.graph.nodes if n.target is batch_norm_})
    return calls


def test_only_temporaries_read_once_go_in_place_and_the_map_is_exact():
    torch.manual_seed(0)
    model = randomize_batchnorm(Shared())
    image = torch.randn(3, 24, 28)
    ex = krypton_fx.compile(model, patch=6, stride=4, image_size=(24, 28))
    calls = _calls(ex)
    assert calls["bn1"] == calls["bn2"] == "batch_norm_"  # a conv's output, read once
    assert calls["act1"] == "ReLU in place"  # through an eval-mode dropout
    assert calls["act2"] == "ReLU6"  # bn2's output is also read by the add
    assert calls["entry"] == "LeakyReLU"  # reads the occluded input
    assert not any(m.inplace for m in model.modules() if hasattr(m, "inplace"))  # the user's modules
    want = krypton_fx.naive_occlusion(model, image, patch=6, stride=4)
    torch.testing.assert_close(ex(image).heatmap, want.heatmap, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_in_place_batch_norm_is_the_norm_bit_for_bit(dims):
    norm = randomize_batchnorm(getattr(nn, f"BatchNorm{dims}d")(5), affine=True)
    x = torch.randn(4, 5, *(7,) * dims)
    if dims > 1:
        x = x.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    want = norm(x)
    args = (norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
    with torch.no_grad():
        out = batch_norm_(x, *args)
    assert out is x and torch.equal(out, want)
    y = torch.randn(2, 5, *(3,) * dims)
    assert batch_norm_(y, *args) is not y  # with grad: F.batch_norm itself


def test_the_models_parameters_keep_one_name_each():
    """The in-place batch norm reads the module's tensors (get_attr): nothing is registered
    twice, so functional_call with the module's own state swaps and restores every tensor."""
    torch.manual_seed(0)
    model = randomize_batchnorm(Shared())
    ex = krypton_fx.compile(model, patch=6, stride=4, image_size=(24, 28))
    image = torch.randn(3, 24, 28)
    _, stored = ex.prepare(image)
    module = ex.program.module
    names = [name for name, _ in module.named_parameters(remove_duplicate=False)]
    assert len(names) == len(set(names)) == len(dict(module.named_parameters()))
    before = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    state = {k: v.clone() for k, v in before.items()}
    out = torch.func.functional_call(module, state, (torch.arange(3), *stored))
    after = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    assert all(after[k] is v for k, v in before.items())  # every tensor put back
    torch.testing.assert_close(out, module(torch.arange(3), *stored))


def test_frozen_norm_in_place_is_the_same_values_and_the_graph_uses_it():
    stats = torch.randn(1, 10, 1, 1)
    x = torch.randn(3, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    want = frozen_norm(x, stats)
    assert frozen_norm_(x, stats) is x and torch.equal(x, want)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.PReLU(),
                          nn.Conv2d(4, 2, 1)).eval()
    ex = krypton_fx.compile(model, patch=4, stride=4, image_size=(16, 16), norm_stats="frozen",
                            target=krypton_fx.SegmentationTarget(1))
    assert frozen_norm_ in {n.target for n in ex.program.module.graph.nodes}


def test_docstring_examples():
    assert doctest.testmod(reinplace).failed == 0
