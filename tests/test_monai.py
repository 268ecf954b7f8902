"""krypton_fx.monai.OcclusionSensitivity against the real monai.visualize.OcclusionSensitivity.

Every end-to-end test runs MONAI 1.6's class and ours on the same model and
image and asserts the same result: MetaTensors of the same shape, dtype and
metadata, occlusion maps within 1e-5 and the same most probable class. A map
that hardly varies would let a wrong implementation pass, so the comparisons
also check that MONAI's map varies by far more than the tolerance.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

monai = pytest.importorskip("monai")

from monai.data import MetaTensor  # noqa: E402
from monai.data.utils import dense_patch_slices  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from monai.inferers.utils import _get_scan_interval  # noqa: E402
from monai.networks.nets import DenseNet, DenseNet121, resnet18  # noqa: E402
from monai.visualize import occlusion_sensitivity as monai_occlusion  # noqa: E402
from strategies import randomize_batchnorm  # noqa: E402

from krypton_fx.monai import OcclusionSensitivity, blend_windows, window_grid  # noqa: E402
from krypton_fx.monai.rules import window_means  # noqa: E402

TOL = 1e-5
MIN_SPREAD = 100 * TOL  # a map must vary by this much for a comparison to mean something

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared machine: one thread is faster than two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models and images -----------------------------------------------------------------------



def small_densenet(dims: int, channels: int, classes: int = 3) -> nn.Module:
    return DenseNet(spatial_dims=dims, in_channels=channels, out_channels=classes, init_features=4,
                    growth_rate=4, block_config=(2, 2))


MODELS = {
    "densenet121_2d": lambda: DenseNet121(spatial_dims=2, in_channels=1, out_channels=3),
    "densenet121_3d": lambda: DenseNet121(spatial_dims=3, in_channels=1, out_channels=2),
    "resnet18_3d_1ch": lambda: resnet18(spatial_dims=3, n_input_channels=1, num_classes=3),
    "resnet18_3d_2ch": lambda: resnet18(spatial_dims=3, n_input_channels=2, num_classes=3),
    "densenet_2d_1ch": lambda: small_densenet(2, 1),
    "densenet_2d_2ch": lambda: small_densenet(2, 2),
    "densenet_2d_2ch_1class": lambda: small_densenet(2, 2, classes=1),
    "densenet_3d_1ch": lambda: small_densenet(3, 1),
    "densenet_3d_2ch": lambda: small_densenet(3, 2),
}
_built: dict = {}


def model(name: str) -> nn.Module:
    """The named model, random-initialised once per session (seeded), in eval mode."""
    if name not in _built:
        torch.manual_seed(sorted(MODELS).index(name))
        _built[name] = randomize_batchnorm(MODELS[name](), seed=1).eval()
    return _built[name]


def image(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


class Rescaled(nn.Module):
    """A classifier with extra forward arguments, to check that kwargs reach the model."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, scale=1.0, shift=None):
        out = self.net(x) * scale
        return out if shift is None else out + shift


# --- running both ----------------------------------------------------------------------------


def run_monai(net, x, b_box=None, model_kwargs=None, **ctor):
    with warnings.catch_warnings():  # MONAI indexes with lists (a torch deprecation warning)
        warnings.simplefilter("ignore")
        return monai_occlusion.OcclusionSensitivity(net, verbose=False, **ctor)(x, b_box=b_box, **(model_kwargs or {}))


def run_ours(net, x, b_box=None, model_kwargs=None, **ctor):
    occ = OcclusionSensitivity(net, verbose=False, **ctor)
    return occ(x, b_box=b_box, **(model_kwargs or {})), occ


def applied_ops(t: MetaTensor) -> list:
    return [{k: v for k, v in op.items() if k != "id"} for op in t.applied_operations]


def assert_same(expected, actual, informative: bool = True) -> float:
    """MONAI's result and ours agree; returns the largest map difference."""
    for e, a in zip(expected, actual):
        assert isinstance(e, MetaTensor) and isinstance(a, MetaTensor)
        assert a.shape == e.shape and a.dtype == e.dtype
        assert torch.equal(a.affine, e.affine)
        assert applied_ops(a) == applied_ops(e)
    diff = float((actual[0] - expected[0]).abs().max())
    assert diff <= TOL
    assert torch.equal(actual[1].as_tensor(), expected[1].as_tensor())
    if informative:  # spread of each class over the voxels MONAI computed (b_box padding is 0)
        values = expected[0].as_tensor().flatten(2)
        spread = max(float(v[v != 0].max() - v[v != 0].min()) for v in values[0])
        assert spread > MIN_SPREAD
    return diff


def compare(net, x, b_box=None, model_kwargs=None, informative=True, **ctor):
    expected = run_monai(net, x, b_box, model_kwargs, **ctor)
    actual, occ = run_ours(net, x, b_box, model_kwargs, **ctor)
    assert_same(expected, actual, informative)
    # Every built-in mode of a traceable model in eval mode goes incremental; a callable
    # mode or extra model arguments need the plain engine.
    plain = callable(ctor.get("mode")) or bool(model_kwargs) or net.training
    assert occ.last_path == ("plain" if plain else "incremental"), occ.last_path_reason
    assert occ.last_path_reason
    return actual, occ


# --- end to end ------------------------------------------------------------------------------

MODES = ["gaussian", "mean_patch", "mean_img", 0.25]
WINDOWS_2D = [  # mask, overlap, b_box
    (8, 0.6, None),
    ((6, 10), 0.5, [3, 13, -1, -1]),
    ((5, 7), 0.0, [-1, -1, 4, 20]),
    (7, 0.5, [0, 0, 2, 20]),  # a maximum of 0: scan to (mask - 1) // 2, output to the end (zeros)
]


@pytest.mark.parametrize("mask,overlap,b_box", WINDOWS_2D)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels", [1, 2])
def test_2d_modes_and_windows(mode, mask, overlap, b_box, channels):
    compare(model(f"densenet_2d_{channels}ch"), image(1, channels, 16, 24), b_box,
            mask_size=mask, overlap=overlap, mode=mode, n_batch=7)


CASES_3D = [  # model, image shape, mask, overlap, b_box, mode
    ("resnet18_3d_2ch", (1, 2, 16, 16, 16), 8, 0.5, None, "gaussian"),
    ("resnet18_3d_1ch", (1, 1, 12, 16, 10), (6, 8, 5), 0.0, [2, 9, -1, -1, 1, 8], "mean_patch"),
    ("resnet18_3d_1ch", (1, 1, 12, 12, 12), (8, 6, 10), 0.6, None, 0.5),
    ("densenet_3d_1ch", (1, 1, 10, 12, 8), (4, 6, 5), 0.6, None, "mean_img"),
    ("densenet_3d_2ch", (1, 2, 12, 10, 14), (5, 4, 6), 0.5, [-1, -1, 3, 7, 2, -1], "gaussian"),
    ("densenet_3d_2ch", (1, 2, 8, 8, 8), 4, 0.6, [1, 6, 0, 5, 2, 7], "mean_patch"),
]


@pytest.mark.parametrize("name,shape,mask,overlap,b_box,mode", CASES_3D)
def test_3d(name, shape, mask, overlap, b_box, mode):
    compare(model(name), image(*shape), b_box, mask_size=mask, overlap=overlap, mode=mode, n_batch=10)


def test_densenet121_2d():
    compare(model("densenet121_2d"), image(1, 1, 32, 32), [4, 27, -1, 30], mask_size=(12, 16), overlap=0.5)


def test_densenet121_3d():
    compare(model("densenet121_3d"), image(1, 1, 32, 32, 32), mask_size=(16, 32, 20), overlap=0.0,
            mode="mean_patch")


@pytest.mark.parametrize("name,channels,classes", [
    ("densenet_2d_1ch", 1, 3),         # one input channel, three classes: sigmoid
    ("densenet_2d_2ch", 2, 3),         # two input channels: softmax
    ("densenet_2d_2ch_1class", 2, 1),  # softmax over a single class (MONAI's rule looks at the input)
])
@pytest.mark.parametrize("activate", [True, False, lambda t: torch.tanh(t) * 2], ids=["true", "false", "callable"])
def test_activate(name, channels, classes, activate):
    informative = not (activate is True and classes == 1)  # softmax of one class is all ones
    actual, _ = compare(model(name), image(1, channels, 20, 20, seed=3), mask_size=6, overlap=0.5,
                        activate=activate, informative=informative)
    if not informative:
        assert torch.all(actual[0] == 1)


def test_model_kwargs():
    net = Rescaled(model("densenet_2d_1ch")).eval()  # a training wrapper would leave the shared model training
    shift = torch.tensor([[0.5, -1.0, 2.0]])
    _, occ = compare(net, image(1, 1, 16, 20), model_kwargs={"scale": 3.0, "shift": shift}, mask_size=6,
                     activate=False)
    assert "extra model arguments" in occ.last_path_reason


def test_training_model_runs_in_eval_mode_and_is_put_back():
    """MONAI runs in eval mode, then calls train() on a model that was training, submodules included."""
    nets = [copy.deepcopy(model("densenet_2d_1ch")) for _ in range(2)]
    for net in nets:
        net.train()
        net.features[0].eval()  # a submodule the caller froze: MONAI leaves it in train mode
    seen = []  # (grad mode, training) at every forward
    nets[1].register_forward_hook(lambda mod, args, out: seen.append((torch.is_grad_enabled(), mod.training)))
    x = image(1, 1, 16, 16)
    expected = run_monai(nets[0], x, mask_size=6)
    actual, occ = run_ours(nets[1], x, mask_size=6)
    assert_same(expected, actual)
    assert seen and set(seen) == {(False, False)}
    assert [m.training for m in nets[1].modules()] == [m.training for m in nets[0].modules()]
    assert all(m.training for m in nets[1].modules())
    assert occ.last_path_reason == "the model is in training mode"


def occlude_with_flip(x, region):
    return region.flip(-1) * 0.5 + x.mean()


def test_callable_mode(monkeypatch):
    """A callable mode as MONAI's predictor applies it: ``mode(x, region)``.

    MONAI 1.6.1 cannot run a callable mode (see the next test); the reference
    is MONAI's own predictor with only its None check of mul/add bypassed.
    """
    predictor = monai_occlusion.OcclusionSensitivity.predictor

    def predictor_without_none_check(cropped_grid, nn_module, x, mul, add, *args, **kwargs):
        return predictor(cropped_grid, nn_module, x, 0 if mul is None else mul, 0 if add is None else add,
                         *args, **kwargs)

    monkeypatch.setattr(monai_occlusion.OcclusionSensitivity, "predictor",
                        staticmethod(predictor_without_none_check))
    _, occ = compare(model("densenet_3d_2ch"), image(1, 2, 10, 8, 12), [1, 8, -1, -1, 2, 11],
                     mask_size=(4, 3, 5), overlap=0.5, mode=occlude_with_flip)
    assert occ.last_path_reason.startswith("mode is a callable")


def test_monai_itself_fails_on_a_callable_mode():
    with pytest.raises(RuntimeError, match="Shouldn't be here"):
        run_monai(model("densenet_2d_1ch"), image(1, 1, 12, 12), mask_size=6, mode=occlude_with_flip)


def test_metatensor_and_float64_input():
    """MONAI computes in x's dtype but returns float32 (an empty MetaTensor's dtype), and drops x's metadata."""
    net = copy.deepcopy(model("densenet_2d_2ch")).double()
    x = MetaTensor(image(1, 2, 16, 18).double(), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])))
    actual, _ = compare(net, x, [2, 12, 3, -1], mask_size=(5, 6), mode="mean_patch")
    assert actual[0].dtype == torch.float32


def test_verbose_progress_bar(capsys):
    OcclusionSensitivity(model("densenet_2d_1ch"), mask_size=8, overlap=0.5, n_batch=4)(image(1, 1, 16, 16))
    assert "3/3" in capsys.readouterr().err  # 9 windows in batches of 4


def test_last_path_says_why_incremental():
    _, occ = compare(model("densenet_2d_1ch"), image(1, 1, 16, 16), mask_size=8)
    assert occ.last_path == "incremental" and "exact incremental inference" in occ.last_path_reason


ERRORS = [  # constructor arguments, image shape, b_box, MONAI's exception type
    (dict(mask_size=4), (2, 1, 12, 12), None, ValueError),                  # batch of two
    (dict(mask_size=(4, 13)), (1, 1, 12, 12), None, ValueError),            # mask larger than image
    (dict(mask_size=4, overlap=1.0), (1, 1, 12, 12), None, ValueError),     # overlap outside [0, 1)
    (dict(mask_size=4, mode=0), (1, 1, 12, 12), None, TypeError),           # an int mode: MONAI takes floats
    (dict(mask_size=(4, 4, 4)), (1, 1, 12, 12), None, ValueError),          # one mask entry too many
]


@pytest.mark.parametrize("ctor,shape,b_box,error", ERRORS)
def test_errors_match_monai(ctor, shape, b_box, error):
    net = model("densenet_2d_1ch")
    with pytest.raises(error):
        run_monai(net, image(*shape), b_box, **ctor)
    with pytest.raises(error) as ours:
        run_ours(net, image(*shape), b_box, **ctor)
    assert len(str(ours.value)) > 20  # ours says what to do


def test_unknown_mode_fails_at_construction():
    net = model("densenet_2d_1ch")
    with pytest.raises(NotImplementedError):
        monai_occlusion.OcclusionSensitivity(net, mode="zeros")
    with pytest.raises(NotImplementedError, match="gaussian"):
        OcclusionSensitivity(net, mode="zeros")


@pytest.mark.parametrize("b_box", [
    [6, 8, -1, -1],  # a box smaller than the mask: MONAI shrinks the mask instead of failing
    [3, -6, -1, 9],  # a negative maximum other than -1: a Python slice stop in the scan, the end in the output
    [3, 11],         # entries for the first axis only: the other axes are not cropped
    [0, 0, -1, -1],  # a maximum of 0: the scan stops at (mask - 1) // 2, the output runs to the end
])
def test_b_box_rules(b_box):
    compare(model("densenet_2d_1ch"), image(1, 1, 16, 18), b_box, mask_size=(9, 4), overlap=0.5)


# --- the parts on their own ------------------------------------------------------------------


@pytest.mark.parametrize("size,mask,overlap", [
    ((10,), (4,), 0.6), ((10, 7), (3, 7), 0.5), ((16, 9, 11), (5, 4, 11), 0.0), ((13, 8), (10, 1), 0.7),
    ((20, 20), (10, 10), 0.9), ((9, 17, 6), (4, 6, 5), 0.6), ((7,), (7,), 0.3), ((10, 10), (3, 5), 0.1),
])
def test_window_grid_matches_dense_patch_slices(size, mask, overlap):
    expected = dense_patch_slices(size, mask, _get_scan_interval(size, mask, len(size), (overlap,) * len(size)))
    grid = window_grid(size, mask, overlap)
    assert [grid.window_slices(i) for i in range(grid.n_windows)] == expected
    assert grid.corners().tolist() == [[s.start for s in w] for w in expected]


@pytest.mark.parametrize("size,mask,overlap", [
    ((11,), (4,), 0.6), ((9, 13), (4, 5), 0.5), ((7, 8, 9), (3, 4, 5), 0.6), ((6, 5, 7), (6, 2, 3), 0.0),
    ((5, 6, 4, 5), (3, 4, 2, 3), 0.5),  # four spatial axes: the window-by-window fallback
])
@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_blend_matches_sliding_window_inference(size, mask, overlap, blend):
    grid = window_grid(size, mask, overlap)
    outputs = torch.rand(grid.n_windows, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    corner_index = {tuple(c): i for i, c in enumerate(grid.corners().tolist())}

    def window_output(coords):  # coords: (B, N, *mask) meshgrid values; its first voxel is the corner
        corners = coords.flatten(2)[:, :, 0].long().tolist()
        out = outputs[[corner_index[tuple(c)] for c in corners]]
        return out.reshape(*out.shape, *[1] * len(size)).expand(-1, -1, *mask).clone()

    coords = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in size], indexing="ij"))[None]
    expected = sliding_window_inference(coords, mask, 5, window_output, overlap=overlap, mode=blend)
    weights = monai.data.utils.compute_importance_map(mask, mode=blend, dtype=torch.float64)
    torch.testing.assert_close(blend_windows(outputs, grid, weights), expected[0], rtol=0, atol=1e-12)


def test_window_means_match_a_loop():
    x = image(1, 2, 9, 7, 8)
    grid = window_grid((9, 7, 8), (4, 3, 5), 0.5, b_box=[2, 8, -1, -1, 1, 6])
    expected = [x[(slice(None), slice(None), *grid.window_slices(i))].mean() for i in range(grid.n_windows)]
    torch.testing.assert_close(window_means(x, grid), torch.stack(expected), rtol=1e-6, atol=0)
    assert np.unique(grid.corners()[:, 0].numpy()).tolist() == list(grid.axis_starts[0])
