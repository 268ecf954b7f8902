"""High resolution (part (a) of the scale benchmarks): theoretical and measured speedup of exact
incremental occlusion as the image grows, where a patch is a smaller part of the image.

ResNet18, ResNet50 and VGG16 (random init) at 224, 448, 896 and 1024 pixels,
patch 16, stride 8: a block of centre positions (every position costs the
same), naive on the same positions with the same batch, the two interleaved
round after round in one process, the minimum of each kept; one CPU thread
by default. Prints measured vs theoretical speedup (eqs. 16-20), the
executed conv multiply-add ratio, and (CUDA) peak memory of each side.
--full also explains one whole image at the largest size with the
incremental graph and extrapolates naive's time from its timed block.

    python bench/highres.py                                     # CPU, small blocks
    python bench/highres.py --device cuda --positions 256 --batch-size 64
    python bench/highres.py --device cuda --models resnet50 --sizes 1024 --patch 32 --full
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torchvision

import krypton_fx
from krypton_fx.benchmark import measure, peak_memory, reset_peak_memory


def mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50,vgg16")
    p.add_argument("--sizes", default="224,448,896,1024")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--positions", type=int, default=8, help="centre positions timed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--full", action="store_true", help="also explain a whole image at the largest size")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("highres.py: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:  # exactness in float32: no TF32 on either side
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name() if cuda else f"CPU ({args.threads} thread(s))"
    print(f"device: {name}; patch {args.patch}, stride {args.stride}, {args.positions} centre positions, "
          f"batch {args.batch_size}, min of {args.rounds} interleaved rounds")
    print(f"{'model':10s} {'size':>5s} {'naive s':>8s} {'krypton s':>9s} {'speedup':>8s} {'theory':>7s} "
          f"{'% theory':>8s} {'exec MAC':>8s} {'naive MiB':>9s} {'kfx MiB':>8s} {'maxdiff':>8s}")
    rows = []
    for model_name in args.models.split(","):
        torch.manual_seed(0)
        model = torchvision.models.get_model(model_name, weights=None).eval().to(device)
        for size in (int(s) for s in args.sizes.split(",")):
            image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
            ex = krypton_fx.compile(model, patch=args.patch, stride=args.stride, image_size=(size, size),
                                    batch_size=args.batch_size, device=device)
            best = None
            for r in range(args.rounds):
                m = measure(model, image, patch=args.patch, stride=args.stride, batch_size=args.batch_size,
                            positions=args.positions, device=device, explainer=ex, warmup=(r == 0))
                if best is None:
                    best = m
                best.naive_s = min(best.naive_s, m.naive_s)
                best.incremental_s = min(best.incremental_s, m.incremental_s)
            speedup = best.naive_s / best.incremental_s
            print(f"{model_name:10s} {size:>5d} {best.naive_s:8.2f} {best.incremental_s:9.2f} {speedup:7.2f}x "
                  f"{best.theoretical:7.2f} {speedup / best.theoretical:8.0%} {best.executed_ratio:8.2f} "
                  f"{mib(best.naive_peak):>9s} {mib(best.incremental_peak):>8s} {best.max_abs_diff:8.1e}",
                  flush=True)
            rows.append({"model": model_name, "size": size, "naive_s": best.naive_s,
                         "incremental_s": best.incremental_s, "speedup": speedup,
                         "theoretical": best.theoretical, "executed_ratio": best.executed_ratio,
                         "naive_peak": best.naive_peak, "incremental_peak": best.incremental_peak,
                         "positions": best.positions, "max_abs_diff": best.max_abs_diff, "device": name})
        if args.full:
            size = max(int(s) for s in args.sizes.split(","))
            image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
            ex = krypton_fx.compile(model, patch=args.patch, stride=args.stride, image_size=(size, size),
                                    batch_size=args.batch_size, device=device)
            ex(image)  # warm
            krypton_fx.tiered.wait_for_kernels()  # (and the kernels compiled in the background)
            reset_peak_memory(device)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            res = ex(image)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            per_position = rows[-1]["naive_s"] / rows[-1]["positions"]
            naive_total = per_position * ex.positions
            peak = peak_memory(device)
            print(f"{model_name} {size}x{size} whole map: {ex.positions} positions in {seconds:.1f} s "
                  f"(naive, extrapolated from its timed block: {naive_total:.1f} s, {naive_total / seconds:.1f}x); "
                  f"peak {mib(peak)} MiB; map {tuple(res.heatmap.shape)}", flush=True)
            rows.append({"model": model_name, "size": size, "full_map_s": seconds, "positions": ex.positions,
                         "naive_extrapolated_s": naive_total, "peak": peak})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
