"""krypton_fx.monai.OcclusionSensitivity against monai.visualize.OcclusionSensitivity, side by side.

The same volume, model and settings (mask 16, overlap 0.5 by default) for
every built-in mode; MONAI's class and ours timed in interleaved rounds in
one process (the minimum of each kept), their outputs compared. Random-init
MONAI 3-D ResNet18 and DenseNet121 with one input channel, at 64^3 by
default; one CPU thread unless --threads says otherwise.

    python bench/monai.py                                  # CPU, 64^3, every mode
    python bench/monai.py --device cuda --size 96 --n-batch 32 --modes gaussian
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

# This script is bench/monai.py: without this, `import monai` would import the script itself.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402


def build(name: str):
    from monai.networks import nets

    torch.manual_seed(0)
    if name == "resnet18":
        return nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2).eval()
    if name == "densenet121":
        return nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    raise SystemExit(f"monai.py: error: unknown model {name!r} (resnet18, densenet121)")


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,densenet121")
    p.add_argument("--modes", default="gaussian,mean_patch,mean_img,0.0")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--mask", type=int, default=16)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--n-batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (MONAI's side is slow)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        from monai.visualize import OcclusionSensitivity as MonaiOcclusion
    except ImportError:
        print("monai.py: error: MONAI is not installed (pip install krypton_fx[monai])", file=sys.stderr)
        return 2
    from krypton_fx.monai import OcclusionSensitivity, window_grid

    torch.set_num_threads(args.threads)
    device = args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({args.threads} thread(s))"
    print(f"device: {name}; {args.size}^3 volume, mask {args.mask}, overlap {args.overlap}, n_batch "
          f"{args.n_batch}, {args.rounds} interleaved round(s), min of each")
    header = f"{'model':12s} {'mode':>10s} {'windows':>8s} {'MONAI s':>9s} {'ours s':>8s} {'speedup':>8s} " \
             f"{'path':>12s} {'max |diff|':>11s}"
    print(header)
    rows = []
    image = torch.randn(1, 1, args.size, args.size, args.size, generator=torch.Generator().manual_seed(0))
    image = image.to(device)
    for model_name in args.models.split(","):
        model = build(model_name).to(device)
        for mode_text in args.modes.split(","):
            mode = float(mode_text) if mode_text[0].isdigit() or mode_text[0] == "-" else mode_text
            kw = dict(mask_size=args.mask, n_batch=args.n_batch, verbose=False, mode=mode, overlap=args.overlap)
            ours = OcclusionSensitivity(model, **kw)
            theirs = MonaiOcclusion(model, **kw)
            best = {"monai": float("inf"), "ours": float("inf")}
            for _ in range(args.rounds):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t, want = timed(lambda m=theirs: m(image), device)
                best["monai"] = min(best["monai"], t)
                t, got = timed(lambda o=ours: o(image), device)  # the first round includes the compile
                best["ours"] = min(best["ours"], t)
            diff = max(float((got[0].as_tensor() - want[0].as_tensor()).abs().max()),
                       float((got[1].as_tensor() != want[1].as_tensor()).any()))
            windows = window_grid((args.size,) * 3, (args.mask,) * 3, args.overlap).n_windows
            speedup = best["monai"] / best["ours"]
            row = {"model": model_name, "mode": mode_text, "windows": windows, "monai_s": best["monai"],
                   "ours_s": best["ours"], "speedup": speedup, "path": ours.last_path, "max_abs_diff": diff,
                   "device": name}
            rows.append(row)
            print(f"{model_name:12s} {mode_text:>10s} {windows:>8d} {best['monai']:9.2f} {best['ours']:8.2f} "
                  f"{speedup:7.2f}x {ours.last_path:>12s} {diff:11.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
