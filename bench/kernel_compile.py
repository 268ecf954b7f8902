"""What a cold first call's Triton compile costs, measured without a GPU.

A first call in a fresh process used to launch each kernel specialisation of the
incremental graph in turn, and Triton compiled each at its first launch, one
after the other. Now the first batch runs on the torch ops and records those
launches, and ``compile_ahead`` compiles them in the background, in parallel
(krypton_fx/tiered.py). Compiling needs no GPU: this records one batch of each
model's incremental graph on the CPU, keeps its distinct specialisations (as
Triton's own binder keys them), and compiles them for sm_90, serially and on a
pool of threads, each from an empty Triton cache (min of ``--rounds``). The
first compile of a process also loads Triton's compiler; that is timed apart.

    python bench/kernel_compile.py
    python bench/kernel_compile.py --models resnet18 --workers 8 --out bench/results/kernel-compile-cpu.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Real kernels (compiled for sm_90, never launched), not the interpreter's stand-ins.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import torchvision  # noqa: E402

import krypton_fx  # noqa: E402
from krypton_fx import ops  # noqa: E402


def recorded_launches(name: str, batch: int) -> list:
    """The kernel launches of one batch of ``name``'s incremental graph (224 px, 299 for
    InceptionV3; patch 16, stride 4), recorded on the CPU."""
    size = 299 if name == "inception_v3" else 224
    kwargs = {"init_weights": False, "aux_logits": False} if name == "inception_v3" else {}
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    # backend="triton" on the CPU is refused outside the interpreter; nothing is launched here.
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        ex = krypton_fx.compile(model, patch=16, stride=4, image_size=(size, size), backend="triton",
                                batch_size=batch, cache=False)
    finally:
        os.environ.pop("TRITON_INTERPRET")
    _, stored = ex.prepare(torch.randn(3, size, size))
    launches: list = []
    with torch.no_grad(), ops.torch_ops(record=launches):
        ex.program.module(torch.arange(batch), *stored)
    return launches


def distinct(launches: list, arch: int) -> list:
    """One launch per specialisation, keyed as Triton's launcher keys its cache."""
    from krypton_fx.triton_kernels import codegen

    seen = {}
    for item in launches:
        seen.setdefault(codegen.specialisation(item.kernel, item.args, item.kwargs, arch), item)
    return list(seen.values())


def timed_compile(kernels: list, workers: int, arch: int) -> float:
    """Seconds to compile ``kernels`` from an empty cache, on ``workers`` threads."""
    from krypton_fx.triton_kernels import codegen

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="krypton-fx-bench-cache-")
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda item: codegen._compile(item.kernel, item.args, item.kwargs, arch), kernels))
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,vgg16,inception_v3")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    launches = {name: recorded_launches(name, args.batch) for name in args.models.split(",")}
    first = next(iter(launches.values()))
    init = timed_compile(distinct(first, args.arch)[:1], 1, args.arch)  # loads the compiler
    lines = [f"bench/kernel_compile.py: sm_{args.arch} from an empty Triton cache, min of {args.rounds} "
             f"rounds; {args.workers} threads on {os.cpu_count()} cores; torch {torch.__version__}, "
             f"{platform.machine()}",
             f"the first compile of the process (loading Triton's compiler): {init:.2f} s"]
    header = f"{'model':<14}{'launches':>9}{'kernels':>8}{'serial s':>10}{'parallel s':>11}{'ratio':>7}"
    lines += [header, "-" * len(header)]
    print("\n".join(lines), flush=True)
    for name, recorded in launches.items():
        kernels = distinct(recorded, args.arch)
        serial = parallel = float("inf")
        for _ in range(args.rounds):  # interleaved
            serial = min(serial, timed_compile(kernels, 1, args.arch))
            parallel = min(parallel, timed_compile(kernels, args.workers, args.arch))
        line = (f"{name:<14}{len(recorded):>9}{len(kernels):>8}{serial:>10.2f}{parallel:>11.2f}"
                f"{serial / parallel:>6.2f}x")
        lines.append(line)
        print(line, flush=True)
    lines.append("serial: what a cold first call waited for before (each kernel compiled at its first "
                 "launch); parallel: compile_ahead's background compile, during which batches run on the "
                 "torch ops. Add the first-compile time once per process to either.")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
