"""The kernels' generated GPU code, compiled ahead of time for sm_90 on the CPU.

No GPU is needed to compile: the checks read PTX and the cubin's resource
usage (krypton_fx/triton_kernels/codegen.py). Compiling runs in a subprocess
without ``TRITON_INTERPRET``, which conftest.py sets for this process and which
replaces the kernels with the interpreter.
"""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import textwrap

import pytest

from krypton_fx.triton_kernels import codegen
from krypton_fx.triton_kernels.codegen import KernelCode, occupancy, ptx_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_compiled(code: str, tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` as a script (Triton reads a kernel's source from its file) without
    the interpreter."""
    script = tmp_path / "compile_check.py"
    script.write_text(textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_docstring_examples():
    assert doctest.testmod(codegen).failed == 0


def test_ptx_stats_counts_data_widths_and_divisions():
    ptx = textwrap.dedent("""\
        ld.global.b64 { %rd1 }, [ %rd2 + 0 ];
        ld.global.b32 { %r1 }, [ %rd3 + 0 ];
        @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd5 + 0 ];
        @%p2 ld.global.v2.b32 { %r6, %r7 }, [ %rd6 + 0 ];
        @%p5 ld.global.b32 { %r12 }, [ %rd12 + 0 ];
        @%p3 st.global.b16 [ %rd7 + 0 ], %rs1;
        st.global.v4.b32 [ %rd8 + 0 ], { %r2, %r3, %r4, %r5 };
        div.s32 %r8, %r9, %r10;
        @%p4 rem.s64 %rd9, %rd10, %rd11;
        div.rn.f32 %f1, %f2, %f3;
    """)
    # Unpredicated scalar loads (a table entry, a scale) are a program's own scalars,
    # not data; a masked scalar load is. The float division is not an integer one.
    assert ptx_stats(ptx) == (frozenset({128, 64, 32, 16}), 3, 2)


@pytest.mark.parametrize("registers, warps, expected", [
    (32, 8, 1.0),      # 8 programs of 8 warps
    (64, 4, 0.5),      # 2048 registers a warp: 32 warps
    (40, 4, 0.75),     # 40 rounds up to 48 a thread: 42 warps, in whole programs of 4
    (28, 1, 0.5),      # one-warp programs: 32 programs an SM at most
    (255, 8, 0.125),   # 8192 registers a warp: 8 warps
])
def test_occupancy_closed_form(registers, warps, expected):
    assert occupancy(registers, warps) == expected


def test_problems_name_each_broken_property():
    good = KernelCode("k", "16x256", frozenset({128}), 0, 1, 8, 32, 0)
    assert good.problems(vectorised=True) == [] and good.occupancy == 1.0
    bad = KernelCode("k", "16x256", frozenset({32, 128}), 12, 17, 4, 40, 24)
    assert bad.problems(vectorised=False) == [
        "17 integer divisions (1 expected: the row decode)",
        "24 bytes of stack (register spills)"]
    assert len(bad.problems(vectorised=True)) == 3


@pytest.mark.parametrize("axes, divisions, ok", [
    (1, 0, True), (1, 1, False),   # signals: one row per position, nothing to decode
    (2, 1, True), (2, 2, False),   # images: (b, i)
    (3, 2, True), (3, 3, False),   # volumes: (b, d, i)
])
def test_row_decode_may_divide_once_per_axis_after_the_first(axes, divisions, ok):
    code = KernelCode("k", "1x16x64", frozenset({128}), 0, divisions, 8, 32, 0, axes)
    assert code.allowed_divisions == axes - 1
    assert (code.problems(vectorised=True) == []) == ok


@pytest.mark.parametrize("options, first_tile", [
    ([], "1x32x64"),                                  # the default launch config
    (["--max-rows", "4", "--tile", "16384"], "4x32x64"),  # several rows per program
])
def test_kernels_compile_to_vectorised_division_free_code_for_sm90(tmp_path, options,
                                                                    first_tile):
    """Every kernel variant of a realistic launch, for signals, images and volumes:
    128-bit data accesses on channels-last maps, integer divisions only for the row
    decode (one per spatial axis after the first), no spills (``--check``)."""
    result = _run_compiled(f"""
        import sys
        from krypton_fx.triton_kernels import codegen
        sys.exit(codegen.main(["--check", *{options!r}]))
    """, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines()
            if line.startswith(("gather", "project", "occlude"))]
    assert len(rows) == 32 and all(row.endswith("none") for row in rows), result.stdout
    assert rows[0].split()[5] == first_tile, rows[0]
    header, = [line for line in result.stdout.splitlines() if line.startswith("kernel")]
    divisions = {row[:header.index("tile")].strip(): int(row[header.index("tile"):].split()[4])
                 for row in rows}
    # The row decode's divisions: (b, d, i) of a volume takes two, a signal's b none.
    volumes = [d for name, d in divisions.items() if name.split()[0].endswith("3d")]
    assert len(volumes) == 11 and set(volumes) == {2}, divisions
    assert divisions["gather1d float32 C=64 window 20"] == 0, divisions


def test_codegen_check_sees_per_element_division_and_scalar_access(tmp_path):
    """The same analysis on a kernel written the slow way (flat index decoded per element
    with // and %, a strided read) finds the divisions and the narrow accesses."""
    result = _run_compiled("""
        import torch, triton, triton.language as tl
        from krypton_fx.triton_kernels import codegen
        from krypton_fx.triton_kernels.ahead import launch, recording

        @triton.jit
        def flat_copy(out_ptr, in_ptr, N, W, C, BLOCK: tl.constexpr):
            k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            row, rest = k // (W * C), k % (W * C)
            j, c = rest // C, rest % C
            x = tl.load(in_ptr + c * 1000 + row * W + j, mask=k < N)
            tl.store(out_ptr + k, x, mask=k < N)

        a, b = torch.zeros(4096), torch.zeros(4096)
        with recording() as calls:
            launch(flat_copy, (4,), a, b, 4096, 33, 7, BLOCK=1024)
        (_, _, args, kwargs), = calls
        compiled = codegen._compile(flat_copy, args, kwargs, 90)
        bits, narrow, divisions = codegen.ptx_stats(compiled.asm["ptx"])
        print(sorted(bits), narrow, divisions)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    bits, narrow, divisions = result.stdout.strip().rsplit(" ", 2)
    assert int(divisions) > 1 and int(narrow) > 0 and bits.startswith("[32"), result.stdout


def test_compiling_under_the_interpreter_is_refused():
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        codegen.compile_cases()


def test_a_recorded_launch_specialises_as_the_real_one(tmp_path):
    """``compile_ahead`` warms the kernels from recorded launches, whose tensors are
    ``Pointer`` stand-ins: Triton's binder must key them exactly as the real tensors, so
    the real launch finds the kernel compiled (aligned or not, each dtype)."""
    result = _run_compiled("""
        import torch
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        from krypton_fx.triton_kernels.ahead import Pointer, recording
        from krypton_fx.triton_kernels.gather import gather_window_triton

        backend = make_backend(GPUTarget("cuda", 90, 32))
        checked = 0
        for dtype in (torch.float32, torch.float16):
            keys = []
            base = torch.zeros(1, 16, 9, 9, dtype=dtype).contiguous(memory_format=torch.channels_last)
            shifted = torch.zeros(base.numel() + 1, dtype=dtype)[1:].as_strided(base.shape, base.stride())
            for stored in (base, shifted):  # 16-byte aligned, and not
                with recording() as launches:
                    gather_window_triton(stored, None, torch.zeros(2, 4, dtype=torch.int64), (3, 3))
                (kernel, _, args, kwargs), = launches
                real = tuple(torch.empty(4, dtype=a.dtype).view(-1)[(a.data_ptr() % 16) // a.dtype.itemsize:]
                             if isinstance(a, Pointer) else a for a in args)
                assert [r.data_ptr() % 16 for r in real if isinstance(r, torch.Tensor)] == \\
                    [a.data_ptr() % 16 for a in args if isinstance(a, Pointer)]
                binder = create_function_from_signature(kernel.signature, kernel.params, backend)
                assert binder(*args, **kwargs)[1:] == binder(*real, **kwargs)[1:]
                assert args[1].data_ptr() == stored.data_ptr()
                keys.append(binder(*args, **kwargs)[1])
                checked += 1
            assert keys[0] != keys[1]  # the binder keys on alignment: the address must be the real one
        print(checked)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"


def test_compile_ahead_compiles_what_the_launches_look_up(tmp_path):
    """``compile_ahead`` through Triton's real ``warmup`` and ``AsyncCompileMode``, for
    sm_90, with a stand-in CUDA driver (no GPU here): the launches one batch of a
    ResNet18 recorded compile in the background, and then every one of them finds its
    kernel in the JIT cache (looked up by Triton's own ``run``, which a launch shares:
    a compile there would fail the check)."""
    result = _run_compiled("""
        import os, torch, torchvision
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver

        class StandInDriver:  # all a warmup asks of the CUDA driver
            def get_current_device(self): return 0
            def get_current_stream(self, device=None): return 0
            def get_current_target(self): return GPUTarget("cuda", 90, 32)
        driver.set_active(StandInDriver())

        import krypton_fx
        from krypton_fx import ops
        from krypton_fx.triton_kernels import ahead

        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).eval()
        os.environ["TRITON_INTERPRET"] = "1"  # (compile() accepts backend="triton" on the CPU)
        ex = krypton_fx.compile(model, patch=8, stride=8, image_size=(64, 64), backend="triton",
                                batch_size=4, cache=False)
        del os.environ["TRITON_INTERPRET"]
        _, stored = ex.prepare(torch.randn(3, 64, 64))
        launches = []
        with torch.no_grad(), ops.torch_ops(record=launches):
            ex.program.module(torch.arange(4), *stored)
        assert ahead.compile_ahead(launches, torch.device("cpu")).result(timeout=600) > 0
        kernels = {item.kernel for item in launches}
        for kernel in kernels:
            def no_compile(*args, **kwargs):
                raise AssertionError("a launch compiled a kernel compile_ahead should have")
            kernel._do_compile = no_compile
        for item in launches:
            assert item.kernel.warmup(*item.args, grid=item.grid, **item.kwargs) is not None
        print(len(launches), len(kernels), sum(len(c[0]) for k in kernels for c in k.device_caches.values()))
    """, tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    launches, kernels, compiled = map(int, result.stdout.split())
    assert launches > kernels >= 2 and compiled >= kernels, result.stdout
