"""krypton_fx.captum.Occlusion against captum.attr.Occlusion, side by side.

Both explain the same images of a random-initialised torchvision model (eval
mode) with the same window, strides, baseline, target and
``perturbations_per_eval``, in one process, one after the other; the script
prints each one's wall-clock time, their ratio and the largest difference of
the two attributions::

    model | image | windows | captum s | krypton_fx s | speedup | path | max |diff|

Captum runs one full forward per window: at 224 x 224 with window (3, 16, 16)
and stride 4 that is 2809 forwards per image, minutes on a CPU. ``--size``
shrinks the image for a quick run.

Usage (from the repository root)::

    python bench/captum.py [--models vgg16,resnet18] [--size 224] [--window 16] [--stride 4]
                           [--perturbations-per-eval 32] [--images 1] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# This file is named captum.py: drop its folder from the path so that
# ``import captum`` finds the library, not this script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.join(_HERE, ".."))

import torch  # noqa: E402
import torchvision  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet18",
                        help="comma-separated torchvision classifiers (random init)")
    parser.add_argument("--size", type=int, default=224, help="image height and width")
    parser.add_argument("--window", type=int, default=16, help="window height and width (all channels)")
    parser.add_argument("--stride", type=int, default=4, help="window stride along height and width")
    parser.add_argument("--perturbations-per-eval", type=int, default=32,
                        help="windows per forward call, the same for both")
    parser.add_argument("--images", type=int, default=1, help="examples in the batch")
    parser.add_argument("--baseline", type=float, default=0.0, help="occluding value")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_model(name: str, seed: int, device: str) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=1000)
    return model.eval().to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from captum.attr import Occlusion as CaptumOcclusion
    except ImportError:
        print("captum is not installed: pip install captum (a test-only dependency of krypton_fx)")
        return 1
    from krypton_fx.captum import Occlusion

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.images, 3, args.size, args.size, generator=gen).to(args.device)
    kwargs = dict(sliding_window_shapes=(3, args.window, args.window),
                  strides=(3, args.stride, args.stride), baselines=args.baseline,
                  perturbations_per_eval=args.perturbations_per_eval)
    per_axis = -(-(args.size - args.window) // args.stride) + 1
    print(f"# device={args.device} threads={torch.get_num_threads()} images={args.images} "
          f"window=(3, {args.window}, {args.window}) strides=(3, {args.stride}, {args.stride}) "
          f"perturbations_per_eval={args.perturbations_per_eval}")
    header = ("model", "image", "windows", "captum s", "krypton_fx s", "speedup", "path", "max |diff|")
    print(" | ".join(header))
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = build_model(name, args.seed, args.device)
        with torch.no_grad():
            target = model(images).argmax(1).tolist()

        synchronize(args.device)
        start = time.perf_counter()
        expected = CaptumOcclusion(model).attribute(images, target=target, **kwargs)
        synchronize(args.device)
        captum_s = time.perf_counter() - start

        occlusion = Occlusion(model)
        synchronize(args.device)
        start = time.perf_counter()  # includes compiling the incremental graph
        result = occlusion.attribute(images, target=target, **kwargs)
        synchronize(args.device)
        krypton_s = time.perf_counter() - start

        diff = float((result - expected).abs().max())
        row = (name, f"{args.size}x{args.size}", str(per_axis * per_axis), f"{captum_s:.2f}",
               f"{krypton_s:.2f}", f"{captum_s / krypton_s:.2f}x", occlusion.last_path, f"{diff:.2e}")
        print(" | ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
