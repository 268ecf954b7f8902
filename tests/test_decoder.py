"""The decoder's ops run incrementally and exactly: encoder-decoder nets (transposed convs,
resampling of every mode, pixel shuffle, skip concats and adds) that end in a classifier
head, against naive occlusion; their decoder nodes are patched, not dense; the conv
multiply-adds they execute match theoretical_speedup."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import assert_random_dag_exact, random_encoder_decoders
from test_packing import _assert_packed_rows_exact
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import krypton_fx
from krypton_fx.passes.patch_prop import State

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


class TinyUNet(nn.Module):
    """Two levels: conv-BN-ReLU, pool, conv, up (``up``), skip concat, conv, then a global head.

    ``up``: ``"transpose"`` (kernel 3, stride 2, padding 1, output padding 1), ``"transpose2"``
    (kernel 2, stride 2), a resampling mode (scale 2; with ``align_corners`` for linear
    modes), ``"size:<mode>"`` (to the skip's size, as torchvision's heads), ``"shuffle"``.
    """

    def __init__(self, up: str, dims: int = 2, channels: int = 2, classes: int = 3):
        super().__init__()
        self.up_kind, self.dims = up, dims
        self.enc = nn.Sequential(_CONV[dims](channels, 4, 3, 1, 1), _BN[dims](4), nn.ReLU())
        self.pool = _POOL[dims](2)
        self.mid = nn.Sequential(_CONV[dims](4, 6, 3, 1, 1), nn.ReLU())
        if up == "transpose":
            self.up = _CONV_T[dims](6, 4, 3, 2, 1, output_padding=1)
        elif up == "transpose2":
            self.up = _CONV_T[dims](6, 4, 2, 2)
        elif up == "shuffle":
            self.up = nn.Sequential(_CONV[dims](6, 16, 1), nn.PixelShuffle(2))
        else:
            mode = up.split(":")[-1]
            self.pre = _CONV[dims](6, 4, 1)
            if not up.startswith("size:"):
                corners = {"align_corners": True} if mode in _LINEAR.values() or mode == "bicubic" else {}
                self.up = nn.Upsample(scale_factor=2, mode=mode, **corners)
        self.dec = nn.Sequential(_CONV[dims](8, 4, 3, 1, 1), nn.ReLU())
        self.head = nn.Linear(4, classes)
        for bn in self.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        skip = self.enc(x)
        y = self.mid(self.pool(skip))
        if self.up_kind.startswith("size:"):
            y = F.interpolate(self.pre(y), size=skip.shape[2:], mode=self.up_kind[5:])
        elif hasattr(self, "pre"):
            y = self.up(self.pre(y))
        else:
            y = self.up(y)
        y = self.dec(torch.cat([y, skip], 1))
        return self.head(y.mean(tuple(range(2, 2 + self.dims))))


def _exact_and_patched(model, size, patch, stride, decoder_nodes=("up",)):
    torch.manual_seed(1)
    image = torch.randn(2, *size)
    ex = krypton_fx.compile(model, patch=patch, stride=stride, image_size=size, channels=2, color=0.5,
                            output="logit", cache=False)
    got = ex(image)
    want = krypton_fx.naive_occlusion(model, image, patch=patch, stride=stride, color=0.5, output="logit",
                                      spatial_dims=len(size))
    assert got.label == want.label
    assert float((got.heatmap - want.heatmap).abs().max()) <= 1e-5
    states = {n.name: info.state for n, info in ex.infos()}
    for name in decoder_nodes:
        found = [s for n, s in states.items() if n == name or n.startswith(name + "_")]
        assert found and all(s is State.PATCHED for s in found), f"{name}: {found}\n{ex.report()}"
    return ex


UPS_2D = ["transpose", "transpose2", "nearest", "nearest-exact", "bilinear", "bicubic", "size:bilinear",
          "size:nearest", "size:area", "shuffle"]


@pytest.mark.parametrize("up", UPS_2D)
def test_unet_2d_is_exact_and_its_decoder_patched(up):
    model = TinyUNet(up).eval()
    node = {"shuffle": "up_1", "size:bilinear": "interpolate", "size:nearest": "interpolate",
            "size:area": "interpolate"}.get(up, "up")
    ex = _exact_and_patched(model, (22, 19) if up.startswith("size:") else (22, 20),
                            (3, 4), (3, 2), decoder_nodes=(node, "dec_0", "cat"))
    assert "patched" in ex.report().split(node, 1)[1].splitlines()[0]


@pytest.mark.parametrize("up", ["transpose", "nearest", "linear"])
def test_unet_1d_is_exact_and_its_decoder_patched(up):
    _exact_and_patched(TinyUNet(up, dims=1).eval(), (40,), (5,), (3,), decoder_nodes=("up", "dec_0"))


@pytest.mark.parametrize("up", ["transpose", "trilinear", "size:nearest-exact"])
def test_unet_3d_is_exact_and_its_decoder_patched(up):
    node = "interpolate" if up.startswith("size:") else "up"
    _exact_and_patched(TinyUNet(up, dims=3).eval(), (16, 16, 18), (2, 2, 3), (5, 5, 5),
                       decoder_nodes=(node, "dec_0"))


class FunctionalDecoder(nn.Module):
    """F.conv_transpose2d with groups and dilation, F.interpolate by a fractional scale (per
    axis, recomputed), an nn.Upsample to a size, a dense bottleneck whose transposed conv
    reads its output size off a patched skip (``output_size=skip.shape``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, 1, 1)
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(6))
        self.resize = nn.Upsample(size=(17, 23), mode="bilinear", align_corners=False)
        self.squeeze = nn.Conv2d(6, 4, 3, 2, 1)
        self.whole = nn.Conv2d(4, 4, (9, 12))  # its output reads the whole map: dense after it
        self.up = nn.ConvTranspose2d(4, 6, (9, 12))
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        skip = F.interpolate(F.relu(self.stem(x)), scale_factor=(1.5, 0.75), mode="bilinear",
                             recompute_scale_factor=True)
        y = F.conv_transpose2d(skip, self.w, self.b, 2, 1, 1, 2, 2)
        y = self.squeeze(self.resize(y))
        deep = self.up(self.whole(y), output_size=y.shape)
        return self.head(torch.cat([deep, y], 1).amax((2, 3)))


@pytest.mark.parametrize("up", ["transpose", "bilinear", "size:nearest"])
def test_a_packed_decoder_program_reads_each_rows_own_image(up):
    """Several images' positions per batch (run_many): rows bit for bit one image's program."""
    _assert_packed_rows_exact(TinyUNet(up).eval(), 2, (14, 12), (3, 4), (3, 4), 0.0, up)


def test_functional_forms_and_shape_queries_are_exact():
    model = FunctionalDecoder().eval()
    ex = _exact_and_patched(model, (16, 18), (4, 3), (3, 4), decoder_nodes=("interpolate", "conv_transpose2d",
                                                                             "resize"))
    states = {n.name: info.state for n, info in ex.infos()}
    assert states["up"] is State.DENSE and states["whole"] is State.DENSE


@settings(max_examples=12, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                  HealthCheck.filter_too_much])
@given(dims=st.sampled_from([1, 2, 3]), data=st.data(), seed=st.integers(0, 2**16))
def test_random_encoder_decoder_equals_naive(dims, data, seed):
    blocks, in_ch = data.draw(random_encoder_decoders(dims=dims), label="net")
    assert_random_dag_exact(blocks, in_ch, data, seed, dims=dims)


def _conv_flops(fn, *args) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    return int(counter.get_flop_counts()["Global"].get(torch.ops.aten.convolution, 0))


class DeeperUNet(nn.Module):
    """Three levels, transposed convs and a bilinear upsampling, skip concats, a global head."""

    def __init__(self, c=8):
        super().__init__()
        conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, 1, 1), nn.ReLU())  # noqa: E731
        self.e1, self.e2, self.e3 = conv(3, c), conv(c, 2 * c), conv(2 * c, 4 * c)
        self.u2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, 2)
        self.d2 = conv(4 * c, 2 * c)
        self.u1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.d1 = conv(3 * c, c)
        self.u0 = nn.ConvTranspose2d(c, c, 3, 1, 1)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        z = self.e3(F.max_pool2d(b, 2))
        b = self.d2(torch.cat([self.u2(z), b], 1))
        a = self.d1(torch.cat([self.u1(b), a], 1))
        return self.head(self.u0(a).mean((2, 3)))


def test_executed_conv_flops_match_theory_on_a_decoder():
    model = DeeperUNet().eval()
    size = (96, 96)
    ex = krypton_fx.compile(model, patch=8, stride=4, image_size=size, batch_size=2, cache=False)
    image = torch.randn(3, *size)
    _, stored = ex.prepare(image)
    centre = torch.tensor([ex.positions // 2, ex.positions // 2 + 1])
    executed = _conv_flops(ex.program.module, centre, *stored) / 2
    full = _conv_flops(model, image[None])
    theory = krypton_fx.theoretical_speedup(model, size, 8)
    assert theory > 2
    assert full / executed == pytest.approx(theory, rel=0.05)
    states = {n.name: info.state for n, info in ex.infos()}
    assert all(states[n] is State.PATCHED for n in ("u2", "u1", "u0", "d1_0"))


def test_tau_runs_on_decoder_ops_and_approximates():
    model = DeeperUNet(c=4).eval()
    image = torch.randn(3, 48, 48)
    exact = krypton_fx.compile(model, patch=8, stride=8, image_size=(48, 48), cache=False)(image)
    approx = krypton_fx.compile(model, patch=8, stride=8, image_size=(48, 48), tau=0.4, cache=False)
    got = approx(image)
    states = {n.name: info for n, info in approx.infos()}
    assert states["u2"].box.sizes[0] <= 0.4 * 24 + 2 * (2 - 1)  # capped, then aligned to the stride
    assert float((got.heatmap - exact.heatmap).abs().max()) < 0.5
    assert krypton_fx.theoretical_speedup(model, (48, 48), 8, tau=0.4) > krypton_fx.theoretical_speedup(
        model, (48, 48), 8)


def test_triton_gathers_on_a_decoder():
    """The Triton backend (interpreted on the CPU) gives the torch backend's map."""
    model = TinyUNet("transpose").eval()
    image = torch.randn(2, 12, 10)
    kw = dict(patch=3, stride=4, image_size=(12, 10), channels=2, cache=False, output="logit")
    torch_map = krypton_fx.compile(model, backend="torch", **kw)(image).heatmap
    triton_map = krypton_fx.compile(model, backend="triton", **kw)(image).heatmap
    torch.testing.assert_close(triton_map, torch_map, atol=1e-6, rtol=1e-6)
