"""The GPU path's contract, checked without a GPU.

Issue 3 asks that the incremental graph keep everything on the device: stored
activations and per-position coordinates live there, no batch synchronises with
the host, there is no Python loop over positions, the batch size comes from
free device memory, and half-precision models work. Each is checked here on
the CPU:

- a *fake* CUDA device (``FakeTensorMode``: shapes, dtypes and devices without
  data) runs the whole incremental graph; a tensor left on the CPU inside it
  would meet a CUDA tensor and fail, and the Triton entry points must be what
  ``backend="auto"`` calls there;
- a dispatch mode records every aten op: none of those that make the host wait
  for the device may appear, and one batch's ops may not depend on how many
  positions it holds.

With ``KRYPTON_TRITON_NATIVE=1`` on a CUDA machine (``bench/gpu_check.sh``) the
runs that need data go to the GPU, and CUDA's own sync debug mode counts the
host synchronisations of a real run.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import pytest
import torch
import torchvision
from strategies import dag_model
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import krypton_fx
from krypton_fx import common
from krypton_fx.triton_kernels import gather, occlusion, projection

NATIVE = bool(os.environ.get("KRYPTON_TRITON_NATIVE"))
if NATIVE and not torch.cuda.is_available():
    pytest.skip("KRYPTON_TRITON_NATIVE=1 needs a CUDA device", allow_module_level=True)
DEVICE = torch.device("cuda" if NATIVE else "cpu")
if NATIVE:  # float32 exactness is meaningless under TF32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

# Aten ops that block the host until the device catches up: a scalar read
# (.item(), int(), float(), bool(), .tolist()), and ops whose output size
# depends on the data (boolean-mask indexing runs nonzero).
HOST_SYNC_OPS = {
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero",
    "aten.nonzero_static", "aten.masked_select", "aten.unique", "aten._unique", "aten._unique2",
    "aten.unique_dim", "aten.unique_consecutive", "aten.repeat_interleave",
    "boolean-mask indexing",  # aten.index/index_put with a bool index: a nonzero inside
}
_INDEX_OPS = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}

def _model(name: str):
    """``(model, image size, patch, stride)``: the shared DAG (every kind of node, a
    small odd image) or a random-init ResNet18 at 64 px."""
    if name == "dag":
        return dag_model(), (21, 19), (5, 4), (4, 3)
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).eval(), (64, 64), 8, 8


class OpLog(TorchDispatchMode):
    """Counts every aten op (by overload packet) and the devices of the tensors it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.off_device: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name in _INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                      for i in args[1]):
            self.ops["boolean-mask indexing"] += 1
        # 0-dim CPU tensors are scalars (torch wraps Python numbers so); anything
        # larger on the CPU would be host data inside the graph.
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type != "cuda" and t.dim() > 0:
                self.off_device[name] += 1
        return out


class _Spy:
    """Stands in for a Triton entry point: counts calls, runs the torch reference."""

    def __init__(self, reference) -> None:
        self.reference, self.calls = reference, 0

    def __call__(self, *args):
        self.calls += 1
        return self.reference(*args)


def _run_on_fake_cuda(ex: krypton_fx.Explainer, image: torch.Tensor, batch: int) -> OpLog:
    """One batch of ``ex``'s incremental graph with its weights, tables and stored
    activations on a fake CUDA device; returns the op log."""
    _, stored = ex.prepare(image)
    module = ex.program.module
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    with FakeTensorMode() as fake:
        on_device = {k: fake.from_tensor(v).to("cuda") for k, v in state.items()}
        stored = [fake.from_tensor(s).to("cuda") for s in stored]
        positions = torch.arange(batch, device="cuda") % ex.positions
        with OpLog() as log:
            out = functional_call(module, on_device, (positions, *stored))
        assert out.device.type == "cuda" and out.shape[0] == batch
    return log


@pytest.mark.parametrize("model_name", ["dag", "resnet18"])
def test_incremental_graph_stays_on_a_cuda_device(model_name, monkeypatch):
    model, size, patch, stride = _model(model_name)
    spies = {"gather_window_triton": _Spy(gather.gather_window_torch),
             "project_to_full_triton": _Spy(projection.project_to_full_torch),
             "occlude_window_triton": _Spy(occlusion.occlude_window_torch)}
    for module in (gather, projection, occlusion):
        for name, spy in spies.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, spy)
    # backend="auto": Triton because the data is on CUDA (the spies stand in for it).
    ex = krypton_fx.compile(model, patch=patch, stride=stride, image_size=size, backend="auto")
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(1))

    logs = [_run_on_fake_cuda(ex, image, batch) for batch in (3, 11, 12)]

    for log in logs:
        assert not log.off_device, f"host tensors inside the graph: {dict(log.off_device)}"
        assert not HOST_SYNC_OPS & set(log.ops), sorted(HOST_SYNC_OPS & set(log.ops))
    # No Python loop over positions: a batch of 12 runs exactly the ops of a batch of 11.
    # (The torch gather picks one of two fixed op sequences by the batch's size: one read
    # from the stored rows and the patch rows once the batch's windows outnumber the stored
    # rows. So batches far apart may differ by that choice, never by a count per position.)
    assert logs[1].ops == logs[2].ops
    graph = ex.program.module.graph
    calls = Counter(n.target.__name__ for n in graph.nodes if n.op == "call_function")
    assert spies["occlude_window_triton"].calls == 3 * calls["occlude_window"] == 3
    assert spies["gather_window_triton"].calls == 3 * calls["gather_window"] > 0
    assert spies["project_to_full_triton"].calls == 3 * calls["project_to_full"] > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_running_positions_never_waits_for_the_device(backend):
    """Many batches, and not one host synchronisation among them."""
    model, size, patch, stride = _model("dag")
    model = model.to(DEVICE)
    ex = krypton_fx.compile(model, patch=patch, stride=stride, image_size=size,
                            backend=backend, batch_size=4)
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logits, stored = ex.prepare(image)
    positions = torch.arange(ex.positions)
    assert ex.positions > 3 * 4  # several batches run
    with OpLog() as log:
        scores = ex.run_positions(positions, stored, label=1)
    assert not HOST_SYNC_OPS & set(log.ops), sorted(HOST_SYNC_OPS & set(log.ops))
    want = krypton_fx.naive_occlusion(model, image, patch=patch, stride=stride, label=1)
    torch.testing.assert_close(scores, want.heatmap.flatten(), atol=1e-5, rtol=0)
    if DEVICE.type == "cuda":
        # Synchronisations of a warm run (graphs captured): the positions' upload and
        # the scores' download, the same for one batch as for many.
        assert _cuda_syncs(ex, positions, stored, batch_size=4) == \
            _cuda_syncs(ex, positions, stored, batch_size=ex.positions)


def _cuda_syncs(ex, positions, stored, batch_size: int) -> int:
    """Host synchronisations CUDA's sync debug mode reports for a warm ``run_positions``."""
    ex.run_positions(positions, stored, label=1, batch_size=batch_size)  # capture, compile
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ex.run_positions(positions, stored, label=1, batch_size=batch_size)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_op_log_sees_a_host_synchronisation():
    """The check above can fail: ``.item()`` and boolean masks are seen."""
    x = torch.arange(6.0)
    with OpLog() as log:
        x.sum().item()
        x[x > 2].sum()
    assert set(log.ops) & HOST_SYNC_OPS == {"aten._local_scalar_dense", "boolean-mask indexing"}


@pytest.mark.parametrize("free_gib, per_position, expected", [
    (30, 100 << 20, 102),     # a third of the free memory: 10 GiB / 100 MiB
    (0.25, 100 << 20, 1),     # less than one position fits: still 1
    (80, 1 << 20, 512),       # capped
])
def test_cuda_batch_size_comes_from_free_device_memory(monkeypatch, free_gib, per_position,
                                                        expected):
    free = int(free_gib * (1 << 30))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    assert common.default_batch_size(torch.device("cuda"), per_position) == expected


@pytest.mark.parametrize("model_name, dtype, backend", [
    ("dag", torch.float16, "torch"), ("dag", torch.float16, "triton"),
    ("dag", torch.bfloat16, "torch"), ("dag", torch.bfloat16, "triton"),
    ("resnet18", torch.bfloat16, "torch"),
], ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else str(v))
def test_half_precision_model_matches_naive_in_its_dtype(model_name, dtype, backend):
    """A half-precision model gives naive occlusion's map computed in the same dtype, to a
    few units of that dtype's rounding at the map's largest value; the map is float32.

    Logits and a bright patch (colour 3): the map spans far more than the tolerance,
    so a map that ignored the patches would fail.
    """
    model, size, patch, stride = _model(model_name)
    model = model.to(DEVICE, dtype)
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    ex = krypton_fx.compile(model, patch=patch, stride=stride, image_size=size, backend=backend,
                            output="logit", color=3.0)
    got = ex(image)
    want = krypton_fx.naive_occlusion(model, image, patch=patch, stride=stride, output="logit",
                                      color=3.0)
    tolerance = 4 * torch.finfo(dtype).eps * float(want.heatmap.abs().max())
    assert got.heatmap.dtype == torch.float32 and got.label == want.label
    assert float(want.heatmap.max() - want.heatmap.min()) > 10 * tolerance
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=tolerance, rtol=0)


@pytest.mark.skipif(not NATIVE, reason="compiles real Triton kernels: KRYPTON_TRITON_NATIVE=1 on CUDA")
def test_tiers_compile_ahead_every_kernel_the_map_launches(monkeypatch):
    """Tiers on a GPU (tests/test_tiered.py checks the logic on the CPU): the first call
    runs on the torch ops while the kernels compile in the background; once that compile
    ends, a call launches only kernels it compiled (Triton's caches do not grow), and
    its map equals the first."""
    from krypton_fx.triton_kernels import gather, occlusion, projection

    monkeypatch.setenv("KRYPTON_FX_TIERED", "1")  # (conftest turns tiers off for the other native tests)
    model, size, patch, stride = _model("resnet18")
    model = model.to(DEVICE)
    image = torch.randn(3, *size, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ex = krypton_fx.compile(model, patch=patch, stride=stride, image_size=size, backend="triton",
                            cache=False)
    first = ex(image)
    tier = ex._build.tier
    assert tier.needed and tier.compiling is not None
    assert tier.compiling.result(timeout=300) > 0  # raises what stopped the compile, if anything
    kernels = (gather._gather_window_kernel, occlusion._occlude_window_kernel,
               projection._project_to_full_kernel)

    def compiled() -> list[int]:
        return [sum(len(caches[0]) for caches in k.device_caches.values()) for k in kernels]

    before = compiled()
    second = ex(image)
    assert compiled() == before and sum(before) > 0
    torch.testing.assert_close(second.heatmap, first.heatmap, atol=1e-5, rtol=0)
