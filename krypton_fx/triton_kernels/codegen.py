"""What the kernels compile to on an NVIDIA GPU, checked without one.

The kernels' speed rests on two properties of their generated code: the
contiguous channel run of a channels-last row moves in 128-bit vectors, and
there is no integer division per element (only one per program, to decode its
row). Both can be read from the PTX, and PTX needs no GPU: Triton compiles for
any architecture ahead of time. This module runs the real launchers on CPU
tensors with the launch intercepted, so each kernel is specialised exactly as a
real launch of that shape would be (dtypes, alignment, unit and 16-divisible
strides, the tile ``_block_sizes`` picks), compiles it for the target, and
reads the PTX and the cubin's resource usage::

    python -m krypton_fx.triton_kernels.codegen            # sm_90 table
    python -m krypton_fx.triton_kernels.codegen --check    # exit 1 if a property fails

Must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

__all__ = ["KernelCode", "ptx_stats", "occupancy", "compile_cases", "main"]


@dataclass(frozen=True)
class KernelCode:
    """One compiled kernel variant and what its code does."""

    case: str               # kernel, dtype and shape
    tile: str               # ROWS x BLOCK_J x BLOCK_C
    vector_bits: frozenset  # widths of the data loads and stores, in bits
    scalar_data: int        # data loads/stores narrower than 128 bits
    divisions: int          # integer div/rem instructions in the whole kernel
    warps: int              # per program
    registers: int          # per thread, from the cubin
    stack: int              # bytes per thread, from the cubin: register spills

    @property
    def occupancy(self) -> float:
        """Warp slots of an SM these programs can fill (see :func:`occupancy`)."""
        return occupancy(self.registers, self.warps)

    def problems(self, vectorised: bool) -> list[str]:
        """What breaks the kernels' properties: one division at most (the row
        decode); where the layout allows it, only 128-bit data accesses; no spills."""
        found = []
        if self.divisions > 1:
            found.append(f"{self.divisions} integer divisions (1 expected: the row decode)")
        if vectorised and (self.scalar_data or self.vector_bits != {128}):
            found.append(f"data accesses of {sorted(self.vector_bits)} bits, "
                         f"{self.scalar_data} narrower than 128")
        if self.stack:
            found.append(f"{self.stack} bytes of stack (register spills)")
        return found


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.b(\d+)\s+(.*)$", re.M)


def ptx_stats(ptx: str) -> tuple[frozenset, int, int]:
    """``(vector_bits, scalar_data, divisions)`` of a kernel's PTX.

    Data accesses are global loads/stores except 64-bit scalar loads (the int64
    table entries, one per program). ``vector_bits`` holds each data access's
    width (``v4.b32`` is 128); ``scalar_data`` counts those under 128 bits;
    ``divisions`` counts ``div``/``rem`` instructions of any integer type.

    Example:
        >>> bits, narrow, divisions = ptx_stats("ld.global.b64 { %rd1 }, [ %rd2 + 0 ];\\n"
        ...     "@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd5 + 0 ];\\n"
        ...     "st.global.b16 [ %rd6 + 0 ], %rs1;\\ndiv.s32 %r6, %r7, %r8;")
        >>> sorted(bits), narrow, divisions
        ([16, 128], 1, 1)
    """
    widths = []
    for op, lanes, bits, _ in _ACCESS.findall(ptx):
        if op == "ld" and not lanes and bits == "64":
            continue  # a table entry
        widths.append(int(lanes or 1) * int(bits))
    divisions = len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:div|rem)\.(?:[su]\d+|full)", ptx, re.M))
    return frozenset(widths), sum(w < 128 for w in widths), divisions


@contextlib.contextmanager
def _intercepted(kernel) -> Iterator[list]:
    """Record the arguments of ``kernel[grid](...)`` calls instead of launching them."""
    calls: list = []

    def record(*args, grid, warmup, **kwargs):
        calls.append((args, kwargs))

    kernel.run = record
    try:
        yield calls
    finally:
        del kernel.run


def _compile(kernel, args: tuple, kwargs: dict, arch: int):
    """Compile one recorded launch for ``sm_<arch>``, specialised as Triton's launcher
    would specialise it (its own binder and argument packing)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                   options=options.__dict__)


def _resources(cubin: bytes) -> tuple[int, int]:
    """``(registers per thread, stack bytes per thread)`` of the compiled kernel, as
    ``cuobjdump --dump-resource-usage`` reads them from the cubin Triton built.
    Stack in a kernel without local arrays is register spills."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                                capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+)\s+STACK:(\d+)", report)
    return int(usage.group(1)), int(usage.group(2))


def occupancy(registers: int, warps: int) -> float:
    """Fraction of an sm_80/sm_90 SM's 64 warp slots that programs of ``warps`` warps
    using ``registers`` per thread can fill: 64K registers, allocated per warp
    in units of 256, and at most 32 programs per SM.

    Example:
        >>> occupancy(32, 8), occupancy(64, 4), occupancy(40, 4)
        (1.0, 0.5, 0.75)
    """
    per_warp = -(-registers * 32 // 256) * 256
    programs = min(32, 65536 // (per_warp * warps))
    return min(64, programs * warps) / 64


def _cases() -> list[tuple[str, bool, Callable[[], object]]]:
    """``(description, vectorised, launch)``: realistic layers in every dtype. ``vectorised``
    says whether the layout allows 128-bit accesses throughout (channels-last maps
    with 16-divisible channels; not the 3-channel NCHW input image)."""
    from .gather import gather_window_triton
    from .occlusion import occlude_window_triton
    from .projection import project_to_full_triton

    def maps(batch, c, hw, patch, dtype):
        stored = torch.zeros(1, c, hw, hw, dtype=dtype)
        patches = torch.zeros(batch, c, patch, patch, dtype=dtype)
        return (stored.contiguous(memory_format=torch.channels_last),
                patches.contiguous(memory_format=torch.channels_last))

    table = torch.zeros(8, 4, dtype=torch.int64)
    starts = torch.zeros(8, 2, dtype=torch.int64)
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype)[6:]
        # VGG16 conv1_2 (64 channels, 20-wide window of an 18-wide patch), ResNet layer1
        # (256, 14 of 12), a late layer (512, 6 of 4).
        for c, hw, window, patch in ((64, 226, 20, 18), (256, 58, 14, 12), (512, 16, 6, 4)):
            stored, patches = maps(8, c, hw, patch, dtype)
            cases.append((f"gather {name} C={c} window {window}", True,
                          lambda s=stored, p=patches, w=window:
                              gather_window_triton(s, p, table, (w, w))))
        stored, _ = maps(8, 64, 58, 1, dtype)
        cases.append((f"gather {name} C=64 no patch", True,
                      lambda s=stored: gather_window_triton(s, None, table, (14, 14))))
        stored, patches = maps(8, 512, 14, 6, dtype)
        cases.append((f"project {name} C=512 14x14", True,
                      lambda s=stored, p=patches: project_to_full_triton(s, p, starts)))
        image = torch.zeros(1, 3, 224, 224, dtype=dtype)
        cases.append((f"occlude {name} NCHW C=3", False,
                      lambda i=image:
                          occlude_window_triton(i, torch.zeros(3), table, (18, 18), (16, 16))))
    return cases


def compile_cases(arch: int = 90) -> list[tuple[KernelCode, bool]]:
    """Every case of :func:`_cases` compiled for ``sm_<arch>``: ``(code, vectorised)``."""
    from .gather import _gather_window_kernel
    from .occlusion import _occlude_window_kernel
    from .projection import _project_to_full_kernel

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    kernels = (_gather_window_kernel, _project_to_full_kernel, _occlude_window_kernel)
    results = []
    for description, vectorised, launch in _cases():
        with contextlib.ExitStack() as exits:
            recorded = [exits.enter_context(_intercepted(k)) for k in kernels]
            launch()
        (kernel, (args, kwargs)), = [(k, calls[0]) for k, calls in zip(kernels, recorded) if calls]
        compiled = _compile(kernel, args, kwargs, arch)
        ptx = compiled.asm["ptx"]
        bits, scalar, divisions = ptx_stats(ptx)
        registers, stack = _resources(compiled.asm["cubin"])
        tile = f"{kwargs['ROWS']}x{kwargs['BLOCK_J']}x{kwargs['BLOCK_C']}"
        results.append((KernelCode(description, tile, bits, scalar, divisions, kwargs["num_warps"],
                                   registers, stack), vectorised))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90,
                        help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every kernel keeps its properties")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="rows per program at most (default: the kernels' own setting)")
    parser.add_argument("--tile", type=int, default=None,
                        help="elements per program (default: the kernels' own setting)")
    parser.add_argument("--warps", type=int, default=None,
                        help="warps per program (default: the kernels' own setting)")
    args = parser.parse_args(argv)
    from .gather import _config

    for name, value in (("max_rows", args.max_rows), ("tile_elements", args.tile),
                        ("num_warps", args.warps)):
        if value is not None:
            if value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            setattr(_config, name, value)
    failures = 0
    print(f"{'kernel':<34} {'tile':<10} {'warps':>5} {'data bits':<10} {'<128':>5} {'div':>4} "
          f"{'regs':>5} {'stack':>6} {'occup.':>7}  problems")
    for code, vectorised in compile_cases(args.arch):
        problems = code.problems(vectorised)
        failures += bool(problems)
        bits = ",".join(str(b) for b in sorted(code.vector_bits))
        print(f"{code.case:<34} {code.tile:<10} {code.warps:>5} {bits:<10} {code.scalar_data:>5} "
              f"{code.divisions:>4} {code.registers:>5} {code.stack:>6} {code.occupancy:>6.0%}  "
              f"{'; '.join(problems) or 'none'}")
    print(f"sm_{args.arch}. tile: rows x columns x channels a program copies; data bits: "
          "widths of the data loads/stores; div: integer div/rem instructions; regs, stack: "
          "per thread, from the cubin; occup.: warp slots of an SM that programs of these "
          "warps and registers can fill (at most 32 programs an SM)")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
