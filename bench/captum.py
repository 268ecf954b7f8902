"""krypton_fx.captum.Occlusion against captum.attr.Occlusion: the cold call and the warm one.

cold: a fresh process builds the model (random init, eval mode) and the
images, then times ``Occlusion(model).attribute(images, ...)`` once; for
krypton_fx that call traces and compiles the incremental graph. warm: the
second call on the same object. Every measurement is its own subprocess of
this script, one per implementation per round, interleaved (Captum first in
even rounds, krypton_fx first in odd ones); each time is the minimum over the
rounds. The script prints, per model::

    model | image | windows | captum cold s | krypton_fx cold s | cold speedup |
        captum warm s | krypton_fx warm s | warm speedup | path | max |diff| | max |attr|

max |diff| compares the two cold calls' attributions (on CUDA, TF32 convolutions
make it larger than float32 rounding). The defaults are the issue's setting: 4
images, window (3, 16, 16), strides (3, 8, 8), perturbations_per_eval=128,
target 3, ResNet18 and VGG16, 224 x 224 on CUDA; on the CPU the images are
64 x 64 and torch runs on one thread, so that Captum finishes in minutes.
On CUDA the first round of krypton_fx also compiles its Triton kernels into
Triton's disk cache; the minimum over rounds leaves that out when rounds > 1.

Usage (from the repository root)::

    python bench/captum.py                                  # CPU, 64 x 64, one thread
    python bench/captum.py --device cuda                    # the issue's setting
    python bench/captum.py --models resnet18 --size 96 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# This file is named captum.py: drop its folder from the path so that
# ``import captum`` finds the library, not this script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.join(_HERE, ".."))

import torch  # noqa: E402

IMPLEMENTATIONS = ("captum", "krypton_fx")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,vgg16",
                        help="comma-separated torchvision classifiers (random init)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="image height and width (224 on CUDA, 64 on CPU)")
    parser.add_argument("--images", type=int, default=4, help="examples in the batch")
    parser.add_argument("--window", type=int, default=16, help="window height and width (all channels)")
    parser.add_argument("--stride", type=int, default=8, help="window stride along height and width")
    parser.add_argument("--perturbations-per-eval", type=int, default=128,
                        help="windows per forward call, the same for both")
    parser.add_argument("--target", type=int, default=3)
    parser.add_argument("--baseline", type=float, default=0.0, help="occluding value")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each time is their minimum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 224 if args.device.startswith("cuda") else 64
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    return args


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- one measurement: a fresh process -----------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    """Time the cold call and the warm one of one implementation; print them as JSON."""
    import torchvision

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "captum":
        from captum.attr import Occlusion
    else:
        from krypton_fx.captum import Occlusion

    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(args.model, weights=None).eval().to(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.images, 3, args.size, args.size, generator=gen).to(args.device)
    kwargs = dict(sliding_window_shapes=(3, args.window, args.window), strides=(3, args.stride, args.stride),
                  baselines=args.baseline, target=args.target,
                  perturbations_per_eval=args.perturbations_per_eval)
    synchronize(args.device)

    start = time.perf_counter()
    occlusion = Occlusion(model)
    attribution = occlusion.attribute(images, **kwargs)
    synchronize(args.device)
    cold = time.perf_counter() - start
    if args.worker != "captum":  # warm: the kernels, not the torch ops standing in while they compile
        from krypton_fx.tiered import wait_for_kernels
        wait_for_kernels()

    start = time.perf_counter()
    occlusion.attribute(images, **kwargs)
    synchronize(args.device)
    warm = time.perf_counter() - start

    if args.save:
        torch.save(attribution.cpu(), args.save)
    print(json.dumps({"cold": cold, "warm": warm, "path": getattr(occlusion, "last_path", "-")}))
    return 0


def measure(args: argparse.Namespace, implementation: str, model: str, save: str) -> dict:
    """Run one worker process; its times, or the error it printed."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", implementation, "--model", model,
               "--save", save, "--device", args.device, "--size", str(args.size),
               "--images", str(args.images), "--window", str(args.window), "--stride", str(args.stride),
               "--perturbations-per-eval", str(args.perturbations_per_eval), "--target", str(args.target),
               "--baseline", str(args.baseline), "--seed", str(args.seed)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the comparison -----------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        import captum  # noqa: F401
    except ImportError:
        print("captum is not installed: pip install captum (a test-only dependency of krypton_fx)")
        return 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device")
        return 1

    per_axis = -(-(args.size - args.window) // args.stride) + 1
    print(f"# device={args.device} threads={args.threads or 'default'} images={args.images} "
          f"size={args.size} window=(3, {args.window}, {args.window}) "
          f"strides=(3, {args.stride}, {args.stride}) perturbations_per_eval={args.perturbations_per_eval} "
          f"target={args.target} rounds={args.rounds} (min of each; subprocesses interleaved)")
    if args.device.startswith("cuda"):
        print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__}")
    header = ("model", "image", "windows", "captum cold s", "krypton_fx cold s", "cold speedup",
              "captum warm s", "krypton_fx warm s", "warm speedup", "path", "max |diff|", "max |attr|")
    print(" | ".join(header), flush=True)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            times = {impl: {"cold": float("inf"), "warm": float("inf")} for impl in IMPLEMENTATIONS}
            path, errors = "-", []
            for r in range(args.rounds):
                for impl in IMPLEMENTATIONS if r % 2 == 0 else IMPLEMENTATIONS[::-1]:
                    got = measure(args, impl, model, os.path.join(tmp, f"{model}-{impl}.pt"))
                    if "error" in got:
                        errors.append(f"{impl}: {' '.join(got['error'])}")
                        continue
                    for key in ("cold", "warm"):
                        times[impl][key] = min(times[impl][key], got[key])
                    if impl == "krypton_fx":
                        path = got["path"]
            if errors:
                failed = True
                print(f"{model} | FAILED: {'; '.join(errors)}", flush=True)
                continue
            ours = torch.load(os.path.join(tmp, f"{model}-krypton_fx.pt"))
            theirs = torch.load(os.path.join(tmp, f"{model}-captum.pt"))
            c, k = times["captum"], times["krypton_fx"]
            row = (model, f"{args.size}x{args.size}", str(per_axis * per_axis),
                   f"{c['cold']:.2f}", f"{k['cold']:.2f}", f"{c['cold'] / k['cold']:.2f}x",
                   f"{c['warm']:.2f}", f"{k['warm']:.2f}", f"{c['warm'] / k['warm']:.2f}x",
                   path, f"{float((ours - theirs).abs().max()):.1e}", f"{float(theirs.abs().max()):.1e}")
            print(" | ".join(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
