"""No silent wrong answer: in-place ops, stale models, threads, dtypes, labels, devices.

Every test here failed on the code before it was written (the wrong map was
returned without an error, or the error said nothing useful).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import krypton_fx
from krypton_fx.passes.functionalize import functionalize

# --- 1. in-place ops used as statements -------------------------------------------------


class InPlaceNet(nn.Module):
    """conv -> conv, then an in-place op as a statement whose result is read later."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.c2(F.relu(self.c1(x)))
        z = self.c3(y)  # reads y before the mutation: must see the old value
        if self.how == "relu_":
            y.relu_()
        elif self.how == "F.relu(inplace=True)":
            F.relu(y, inplace=True)
        elif self.how == "mul_":
            y.mul_(2.0)
        elif self.how == "sigmoid_":
            y.sigmoid_()
        elif self.how == "torch.relu_":
            torch.relu_(y)
        elif self.how == "zero_":  # no out-of-place twin: clone, then zero
            y.zero_()
        elif self.how == "ReLU(inplace=True)":
            self.act(y)
        return self.fc((y + z).mean((2, 3)))


def _twin(model: nn.Module, how: str) -> nn.Module:
    """The same weights with another in-place op (or none)."""
    other = InPlaceNet(how).eval()
    other.load_state_dict(model.state_dict())
    return other


INPLACE = ["relu_", "F.relu(inplace=True)", "mul_", "sigmoid_", "torch.relu_", "zero_",
           "ReLU(inplace=True)"]


@pytest.mark.parametrize("how", INPLACE)
def test_inplace_statement_is_exact(how):
    torch.manual_seed(0)
    model = InPlaceNet(how).eval()
    image = torch.randn(3, 20, 20)
    ex = krypton_fx.compile(model, patch=5, stride=3, image_size=(20, 20), output="logit")
    got, want = ex(image), krypton_fx.naive_occlusion(model, image, patch=5, stride=3, output="logit")
    ignored = krypton_fx.naive_occlusion(_twin(model, "none"), image, patch=5, stride=3, output="logit")
    # A map that missed the mutation would be about this far off: far more than the tolerance.
    assert float((ignored.heatmap - want.heatmap).abs().max()) > 1e-3
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-5, rtol=1e-5)


def test_captum_drop_in_inherits_the_fix():
    captum = pytest.importorskip("captum.attr")
    from krypton_fx.captum import Occlusion

    torch.manual_seed(1)
    model = InPlaceNet("relu_").eval()
    x = torch.randn(2, 3, 16, 16)
    kw = dict(sliding_window_shapes=(3, 4, 4), strides=(3, 4, 4), target=1)
    ours = Occlusion(model)
    got = ours.attribute(x, **kw)
    assert ours.last_path == "incremental"
    torch.testing.assert_close(got, captum.Occlusion(model).attribute(x, **kw), atol=1e-5, rtol=1e-4)


class ViewThenMutate(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.c(x)
        head = y[:, :2]  # a different view of y
        head.mul_(3.0)   # mutates y through the view
        return self.fc(y.mean((2, 3)))


def test_mutation_through_a_view_is_refused_with_a_hint():
    ex = krypton_fx.compile(ViewThenMutate(), patch=4, stride=4, image_size=(12, 12))
    with pytest.raises(ValueError, match="another view.*Hint: use the out-of-place form"):
        ex(torch.randn(3, 12, 12))


class AliasedAugmentedAssign(nn.Module):
    """``z = y; y += 1``: eager mutates z too, fx records a plain add (z keeps the old value)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.c(x)
        z = y
        y += 1.0
        return self.fc((z * y).mean((2, 3)))


def test_a_graph_that_differs_from_the_model_is_refused():
    torch.manual_seed(2)
    ex = krypton_fx.compile(AliasedAugmentedAssign().eval(), patch=4, stride=4, image_size=(12, 12))
    with pytest.raises(ValueError, match="does not reproduce the model"):
        ex(torch.randn(3, 12, 12))


def test_functionalize_keeps_the_callers_graph():
    gm = fx.symbolic_trace(InPlaceNet("relu_"))
    before = str(gm.graph)
    new = functionalize(gm)
    assert str(gm.graph) == before and new is not gm
    assert not [n for n in new.graph.nodes if n.op == "call_method" and n.target.endswith("_")]


# --- 2. x.view(x.size(0), -1) after a conv/pool --------------------------------------------


class ViewFlatten(nn.Module):
    def __init__(self, minus_one_first: bool):
        super().__init__()
        self.minus_one_first = minus_one_first
        self.c = nn.Conv2d(3, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(5 * 8 * 8, 3)

    def forward(self, x):
        x = self.pool(F.relu(self.c(x)))
        x = x.view(-1, 5 * 8 * 8) if self.minus_one_first else x.view(x.size(0), -1)
        return self.fc(x)


@pytest.mark.parametrize("minus_one_first", [False, True])
def test_view_flatten_after_a_pool_is_exact(minus_one_first):
    torch.manual_seed(3)
    model = ViewFlatten(minus_one_first).eval()
    image = torch.randn(3, 16, 16)
    got = krypton_fx.compile(model, patch=4, stride=2, image_size=(16, 16))(image)
    want = krypton_fx.naive_occlusion(model, image, patch=4, stride=2)
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-5, rtol=0)


# --- 3. the model as it is at call time ------------------------------------------------------


def _small_resnet():
    torch.manual_seed(4)
    return torchvision.models.resnet18(num_classes=5).eval()


def _replace_weight(m):
    m.conv1.weight = nn.Parameter(torch.randn_like(m.conv1.weight) * 0.1)


def _replace_head(m):
    m.fc = nn.Linear(512, 5)


def _replace_buffer(m):
    m.bn1.running_mean = torch.randn(64)


@pytest.mark.parametrize("change", [_replace_weight, _replace_head, _replace_buffer])
def test_replaced_parameters_buffers_and_submodules_are_used(change):
    model = _small_resnet()
    image = torch.randn(3, 40, 40)
    ex = krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40))
    before = ex(image)
    change(model)
    got = ex(image)
    want = krypton_fx.naive_occlusion(model, image, patch=12, stride=10)
    assert float((before.heatmap - want.heatmap).abs().max()) > 1e-3  # the change matters
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-5, rtol=0)
    assert got.base_prob == pytest.approx(want.base_prob, abs=1e-6)


def test_each_call_walks_the_model_for_replaced_parts_once(monkeypatch):
    """The check above runs once a call (run_many: once for all its images), not once per
    property read; a replacement between calls is still seen (the test above)."""
    from krypton_fx import explainer as explainer_module
    from krypton_fx.tracing import model_signature

    model = _small_resnet()
    images = torch.randn(3, 3, 40, 40)
    ex = krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40), cache=False)
    ex(images[0])
    walks = []
    monkeypatch.setattr(explainer_module, "model_signature", lambda m: walks.append(m) or model_signature(m))
    ex(images[0])
    assert len(walks) == 1
    ex.run_many(images)
    assert len(walks) == 2
    logits, stored = ex.prepare(images[1])
    ex.run_positions(torch.arange(ex.positions), stored, 0)
    assert len(walks) == 4
    _replace_head(model)
    ex(images[0])  # seen: compiled again
    assert ex._traced[1].fc is model.fc


def test_model_cast_after_compile_gives_a_clear_error():
    model = _small_resnet()
    ex = krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40))
    model.double()
    with pytest.raises(TypeError, match="model computes in float64.*image.to"):
        ex(torch.randn(3, 40, 40))
    got = ex(torch.randn(3, 40, 40, dtype=torch.float64))  # compiled again for float64
    assert got.heatmap.shape == ex.grid


# --- 4. naive_occlusion validates as compile does ------------------------------------------------


@pytest.mark.parametrize("batch_size", [-3, 0, 2.5, True])
def test_naive_rejects_a_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        krypton_fx.naive_occlusion(_small_resnet(), torch.randn(3, 40, 40), batch_size=batch_size)


def test_call_rejects_a_bad_batch_size_and_reports_the_one_used():
    ex = krypton_fx.compile(_small_resnet(), patch=12, stride=10, image_size=(40, 40))
    with pytest.raises(ValueError, match="batch_size"):
        ex(torch.randn(3, 40, 40), batch_size=-5)
    assert ex(torch.randn(3, 40, 40), batch_size=100000).stats["batch_size"] == ex.positions == 9


# --- 5. threads ---------------------------------------------------------------------------------


def test_calls_from_several_threads_equal_sequential_and_restore_modes():
    model = _small_resnet()
    model.train()
    model.layer1.eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    stats = [b.clone() for b in model.buffers()]
    images = [torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    ex = krypton_fx.compile(model, patch=12, stride=10, image_size=(40, 40))
    sequential = [ex(x).heatmap for x in images]
    results: list = [None] * len(images)
    errors: list = []

    def run(i):
        try:
            results[i] = ex(images[i]).heatmap
            krypton_fx.naive_occlusion(model, images[i], patch=12, stride=10)  # overlaps too
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, sequential):
        assert torch.equal(got, want)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats))


# --- 8. dtypes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_image_of_another_dtype_is_a_clear_error(dtype):
    ex = krypton_fx.compile(_small_resnet(), patch=12, stride=10, image_size=(40, 40))
    with pytest.raises(TypeError, match=r"computes in float32; convert it first: image.to\(torch.float32\)"):
        ex(torch.randn(3, 40, 40).to(dtype))
    with pytest.raises(TypeError, match="computes in float32"):
        krypton_fx.naive_occlusion(_small_resnet(), torch.randn(3, 40, 40).to(dtype))


# --- 9. labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", [3, np.int64(3), np.int32(3), torch.tensor(3), torch.tensor([3])])
def test_integer_labels_of_any_integer_type(label):
    ex = krypton_fx.compile(_small_resnet(), patch=12, stride=10, image_size=(40, 40))
    assert ex(torch.randn(3, 40, 40), label=label).label == 3


@pytest.mark.parametrize("label", [3.0, True, torch.tensor(3.0), torch.tensor([1, 2]), "3"])
def test_non_integer_labels_name_the_type(label):
    ex = krypton_fx.compile(_small_resnet(), patch=12, stride=10, image_size=(40, 40))
    with pytest.raises(TypeError, match="label must be an integer class index"):
        ex(torch.randn(3, 40, 40), label=label)


# --- 10. backends and devices --------------------------------------------------------------------------


def test_triton_backend_on_the_cpu_is_refused_at_compile_time(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA device"):
        krypton_fx.compile(_small_resnet(), patch=12, image_size=(40, 40), backend="triton", device="cpu")


@pytest.mark.parametrize("device,match", [("banana", "not a device torch knows"),
                                          ("mps", "MPS is not available|")])
def test_unknown_or_missing_devices(device, match):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ValueError, match=match):
        krypton_fx.compile(_small_resnet(), patch=12, image_size=(40, 40), device=device)


# --- 11. colours in the model's dtype -------------------------------------------------------------------


def test_color_out_of_range_for_float32():
    with pytest.raises(ValueError, match="out of range for the model's float32"):
        krypton_fx.compile(_small_resnet(), patch=12, image_size=(40, 40), color=1e300)
    with pytest.raises(ValueError, match="out of range"):
        krypton_fx.naive_occlusion(_small_resnet(), torch.randn(3, 40, 40), color=[0.0, 1e300, 0.0])


# --- 12. models that cannot be explained ------------------------------------------------------------------


def test_theoretical_speedup_of_a_model_that_cannot_run_is_a_value_error():
    vit = torchvision.models.vit_b_16()
    with pytest.raises(ValueError, match="cannot run on a .* input.*Hint"):
        krypton_fx.theoretical_speedup(vit, (64, 64), 16)


class ItemAssignment(nn.Module):
    def forward(self, x):
        y = x * 2
        y[:, :2] = 0
        return y.mean((2, 3))


def test_item_assignment_hint_says_how_to_write_it():
    with pytest.raises(krypton_fx.TraceError, match="item assignment.*out of place"):
        krypton_fx.compile(ItemAssignment(), patch=4, image_size=(12, 12))


# --- 13. smaller things ----------------------------------------------------------------------------------


def test_overlay_leaves_small_drops_transparent():
    from krypton_fx.viz import overlay_alpha

    alpha = overlay_alpha(np.array([0.0, 1e-4, -0.02, 0.09, 0.5, -1.0, 3.0]), limit=1.0)
    assert alpha[:4].tolist() == [0.0, 0.0, 0.0, 0.0]  # no tint, no lines at zero crossings
    assert 0.0 < alpha[4] < alpha[5] == alpha[6] == 0.75


def test_tune_table_says_n_a_for_maps_without_a_drop():
    from krypton_fx.approx import TuneResult

    result = TuneResult(tau=0.8, target_ssim=0.9, taus=(0.6, 0.8), ssims=np.ones((2, 2)),
                        coeffs=np.array([0.0, 0.0, 1.0]), expected_speedup=2.0,
                        drop_kept=np.full((2, 2), np.nan))
    text = str(result)
    assert "nan" not in text and "n/a" in text
