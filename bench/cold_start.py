"""One image, cold: a fresh process that compiles and explains one image, against a fresh process
that runs the naive map of the same image (cuDNN's autotuning and Triton's compiles included).

Each measurement is its own subprocess of this script (nothing warm carries over but the
disk caches), naive and krypton_fx interleaved per model. The first krypton_fx process of
each model starts from an empty Triton cache (its own directory), the second finds that
cache warm, so both rounds are printed, with the first process's background compile; a
third krypton_fx process, from an empty cache again, runs with tiers off
(``KRYPTON_FX_TIERED=0``: each kernel compiled at its first launch, as before tiers).

    python bench/cold_start.py                        # CPU (one thread), 64 x 64 images (InceptionV3 96)
    python bench/cold_start.py --device cuda          # ResNet18, VGG16 at 224, InceptionV3 at 299
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def worker(args) -> None:
    import torch
    import torchvision

    import krypton_fx

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.size or (299 if args.model == "inception_v3" else 224)
    kwargs = {"init_weights": False, "aux_logits": False} if args.model == "inception_v3" else {}
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None, **kwargs).eval().to(device)
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    parts = {}
    if args.worker == "naive":
        krypton_fx.naive_occlusion(model, image, patch=16, stride=args.stride, batch_size=args.batch_size)
    else:
        # What ex(image) does, step by step: where a cold first call's time goes.
        ex = krypton_fx.compile(model, patch=16, stride=args.stride, image_size=(size, size),
                                batch_size=args.batch_size, device=device)
        sync()
        parts["trace_s"] = time.perf_counter() - start
        # functionalize, PatchProp (its run is the unoccluded pass), rewrite, tables to the
        # device, and the traced-vs-eager check
        logits, stored = ex.prepare(image)
        sync()
        parts["prepare_s"] = time.perf_counter() - start - parts["trace_s"]
        # the positions: torch ops while the kernels compile, or (tiers off) each kernel compiled
        # at its first launch; CUDA-graph captures
        ex.run_positions(torch.arange(ex.positions), stored, int(logits.argmax(1)))
    sync()
    seconds = time.perf_counter() - start
    if parts:
        parts["map_s"] = seconds - parts["trace_s"] - parts["prepare_s"]
    tier = ex._build.tier if args.worker != "naive" else None
    # Where the first call ran on the torch ops while the kernels compiled (krypton_fx/tiered.py):
    # how long that background compile took (not counted above, and not waited for by the call).
    compile_s = tier.compiling.result() if tier is not None and tier.compiling is not None else None
    print(json.dumps({"seconds": seconds, "background_compile_s": compile_s, **parts}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,vgg16,inception_v3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=None,
                   help="image size (default: 224 on CUDA, 64 on the CPU; InceptionV3 299 and 96, its least is 75)")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--second", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a second krypton_fx process, with Triton's disk cache warm")
    p.add_argument("--worker", choices=("naive", "krypton"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cpu = not args.device.startswith("cuda")
    sizes = {model: args.size or ((96 if model == "inception_v3" else 64) if cpu else None)
             for model in args.models.split(",")}
    print(f"one image, cold, each in a fresh process ({args.device}); patch 16, stride {args.stride}, "
          f"batch {args.batch_size}; image size " + ", ".join(f"{m} {s or 'default'}" for m, s in sizes.items()))
    print(f"{'model':14s} {'naive s':>8s} {'krypton 1st s':>13s} {'krypton 2nd s':>13s} {'ratio 1st':>9s} "
          f"{'ratio 2nd':>9s} {'untiered 1st':>13s}")

    def run(side: str, model: str, cache: str, **env: str) -> dict:
        cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--device", args.device,
               "--stride", str(args.stride), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        if sizes[model]:
            cmd += ["--size", str(sizes[model])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env={**os.environ, "TRITON_CACHE_DIR": cache, **env}).stdout
        return json.loads(out.strip().splitlines()[-1])

    breakdown = ["where the first process's time went (prepare: functionalize, PatchProp = the unoccluded "
                 "pass, rewrite, tables, the traced-vs-eager check; map: the positions, with any Triton "
                 "compile and CUDA-graph capture):"]
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="krypton-fx-triton-cache-") as cache:
            first = run("krypton", model, cache)
            naive = run("naive", model, cache)["seconds"]
            second = run("krypton", model, cache)["seconds"] if args.second else float("nan")
        with tempfile.TemporaryDirectory(prefix="krypton-fx-triton-cache-") as cache:
            off = run("krypton", model, cache, KRYPTON_FX_TIERED="0")
        untiered = off["seconds"]
        compiled = first["background_compile_s"]
        breakdown.append(f"{model:14s} tiers on: trace {first['trace_s']:.2f} s, prepare {first['prepare_s']:.2f} s, "
                         f"map {first['map_s']:.2f} s | tiers off: trace {off['trace_s']:.2f} s, prepare "
                         f"{off['prepare_s']:.2f} s, map {off['map_s']:.2f} s")
        print(f"{model:14s} {naive:8.2f} {first['seconds']:13.2f} {second:13.2f} "
              f"{naive / first['seconds']:8.2f}x {naive / second:8.2f}x {untiered:13.2f}"
              + (f"   (1st: kernels compiled in the background in {compiled:.2f} s)" if compiled else ""),
              flush=True)
    print("\n".join(breakdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
