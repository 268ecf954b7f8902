"""Approximate occlusion on trained lesion models: tau tuning, drill-down, speed and quality.

For each model (narrow VGG16 / ResNet18 / InceptionV3 with torchvision's layer
geometry, trained by ``krypton_fx.lesions``), the script

1. tunes tau for a target SSIM on ``--tune-images`` lesion images (seed 100),
2. on ``--images`` held-out lesion images (seed 200, never used for tuning or
   training) computes the exact heat map and, for every tau in ``--taus`` (and
   the tuned one), the approximate map with drill-down off and on,
3. prints one row per (tau, drill-down): positions run, seconds per image,
   measured speedup vs naive, the theoretical one, mean / min SSIM to the exact
   map, the fraction of maps with SSIM >= target, and how often the strongest
   drop falls on the lesion. SSIM uses L = 1 (probabilities lie in [0, 1]);
   the "span" columns repeat min and fraction with the stricter L = the exact
   map's own max - min (krypton_fx.approx.heatmap_ssim).

Naive occlusion of a full grid (2809 positions at 224 px, stride 4) takes
minutes per image on a small CPU, so it is timed on ``--naive-positions``
positions at the image centre (same batch size, right before the approximate
runs of the same image) and extrapolated per position to the full grid; the
output says so. Every approximate time is a full ``explainer(image)`` call,
including the unoccluded inference.

Drill-down defaults to ``r = 0.1`` (a lesion's drop covers about 3% of the
grid) and a stage-one stride of 8 px: at 16 px (the patch size) stage one often
misses a lesion smaller than the patch, whose drop only shows when the patch
covers it completely (the paper's caveat on large S1, section 4.3).

Usage (from the repository root)::

    python bench/approx.py --models vgg16 --images 6 --tune-images 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import krypton_fx  # noqa: E402
from krypton_fx import geometry as geo  # noqa: E402
from krypton_fx import lesions  # noqa: E402
from krypton_fx.approx import DrillDown, drill_down_speedup, drop_kept, guard_tau, heatmap_ssim  # noqa: E402
from krypton_fx.ops import occlude_window  # noqa: E402

TUNE_SEED, HELD_OUT_SEED = 100, 200


def lesion_images(n: int, size: int, seed: int):
    """The first ``n`` images with a lesion from ``make_dataset(seed)`` (and their boxes)."""
    images, labels, boxes = lesions.make_dataset(3 * n + 8, size, seed=seed)
    keep = (labels == 1).nonzero().view(-1)[:n]
    return images[keep], boxes[keep]


@torch.no_grad()
def naive_seconds_per_position(model, image, ex, count: int, batch: int) -> float:
    """Wall seconds per position of naive batched occlusion on ``count`` centre positions."""
    h, w = image.shape[-2:]
    ys, xs, _ = geo.occlusion_grid((h, w), ex.patch, ex.stride)
    start = max(0, len(ys) // 2 - count // 2)
    sel = slice(start, start + count)
    table = torch.stack([torch.zeros_like(ys), torch.zeros_like(xs), ys, xs], 1)[sel]
    x = image[None]
    t0 = time.perf_counter()
    for lo in range(0, len(table), batch):
        occluded = occlude_window(x, ex.color, table[lo:lo + batch], (h, w), ex.patch, backend="torch")
        torch.softmax(model(occluded.contiguous()), 1)
    return (time.perf_counter() - t0) / len(table)


def strongest_drop_on_lesion(heatmap: torch.Tensor, box, stride, patch) -> bool:
    """Does the patch at the heat map's minimum overlap the lesion's bounding box?"""
    k = int(heatmap.argmin())
    py, px = (k // heatmap.shape[1]) * stride[0], (k % heatmap.shape[1]) * stride[1]
    y, x, h, w = (int(v) for v in box)
    return py < y + h and y < py + patch[0] and px < x + w and x < px + patch[1]


def run_model(arch: str, args) -> dict:
    size = lesions.DEFAULT_SIZE[arch]
    model = lesions.load_or_train(arch, progress=True)
    info = lesions.training_info(arch)
    print(f"\n=== {arch}-shaped lesion model at {size}x{size}: held-out accuracy "
          f"{info.get('accuracy', float('nan')):.3f} ({info.get('steps')} steps, "
          f"{info.get('train_seconds', 0):.0f}s training) ===", flush=True)
    bs = args.batch_size
    compile_kw = dict(patch=args.patch, stride=args.stride, image_size=(size, size), batch_size=bs)

    tune_images, _ = lesion_images(args.tune_images, size, TUNE_SEED)
    exact_ex = krypton_fx.compile(model, tau=1.0, **compile_kw)
    t0 = time.perf_counter()
    tuned = krypton_fx.tune(exact_ex, tune_images, target_ssim=args.target,
                            taus=[t for t in args.taus if t < 1.0], progress=True)
    print(tuned)
    print(f"(tuning took {time.perf_counter() - t0:.0f}s)")
    guarded = guard_tau(tuned.taus, tuned.drop_kept, tuned.tau, args.min_drop_kept)
    print(f"with the guard min_drop_kept={args.min_drop_kept:g} the same tuning data picks tau {guarded:.3f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tuned.plot(os.path.join(args.out, f"tune-{arch}.png"))

    dd = DrillDown(r=args.r, stage1_stride=args.stage1_stride)
    taus = sorted(set(args.taus) | {round(tuned.tau, 3), round(guarded, 3)}, reverse=True)
    explainers = {t: exact_ex if t == 1.0 else krypton_fx.compile(model, tau=t, **compile_kw) for t in taus}
    theory = {t: krypton_fx.theoretical_speedup(model, (size, size), args.patch, tau=t) for t in taus}
    configs = [(t, use_dd) for t in taus for use_dd in (False, True)]
    held, boxes = lesion_images(args.images, size, HELD_OUT_SEED)
    for ex in explainers.values():  # first-call overheads out of the timings
        logits, stored = ex.prepare(held[0])
        ex.run_positions(torch.arange(min(bs, ex.positions)), stored, 0)

    rows = {c: {"seconds": [], "ssim": [], "ssim_span": [], "kept": [], "hit": [], "positions": []}
            for c in configs}
    naive_pp, exact_hits = [], []
    for i, (image, box) in enumerate(zip(held, boxes)):
        naive_pp.append(naive_seconds_per_position(model, image, exact_ex, args.naive_positions, bs))
        t0 = time.perf_counter()
        exact = exact_ex(image)
        exact_s = time.perf_counter() - t0
        exact_hits.append(strongest_drop_on_lesion(exact.heatmap, box, exact.stride, exact.patch))
        for tau, use_dd in configs:
            ex = explainers[tau]
            if tau == 1.0 and not use_dd:
                res, seconds = exact, exact_s
            else:
                t0 = time.perf_counter()
                res = ex(image, label=exact.label, drill_down=dd if use_dd else None)
                seconds = time.perf_counter() - t0
            assert res.heatmap.shape == exact.heatmap.shape
            row = rows[(tau, use_dd)]
            row["seconds"].append(seconds)
            row["ssim"].append(heatmap_ssim(exact.heatmap, res.heatmap))
            row["ssim_span"].append(heatmap_ssim(exact.heatmap, res.heatmap, data_range=None))
            row["kept"].append(drop_kept(exact, res.heatmap))
            row["hit"].append(strongest_drop_on_lesion(res.heatmap, box, res.stride, res.patch))
            row["positions"].append(res.stats.get("positions_run", ex.positions))
        print(f"[bench] {arch} image {i + 1}/{len(held)}: label {exact.label} base {exact.base_prob:.3f}, "
              f"min {float(exact.heatmap.min()):.3f}, naive {naive_pp[-1] * 1e3:.1f} ms/position, "
              f"exact {exact_s:.1f}s", flush=True)

    positions = exact_ex.positions
    s1 = dd.stage1_step(exact_ex.stride)
    s1_px = (s1[0] * exact_ex.stride[0], s1[1] * exact_ex.stride[1])
    expected_dd = drill_down_speedup(s1_px, exact_ex.stride, dd.r)
    print(f"\n{arch}: {len(held)} held-out lesion images, patch {args.patch}, stride {args.stride}, "
          f"{positions} positions, batch {bs}; drill-down r={dd.r:g}, stage-one stride {s1_px} "
          f"(eq. 46: {expected_dd:.2f}x); tuned tau {tuned.tau:.3f} for SSIM {args.target:g}")
    print(f"naive: timed on {args.naive_positions} centre positions per image and extrapolated per "
          f"position to all {positions}: {statistics.mean(naive_pp) * 1e3:.1f} ms/position, "
          f"{statistics.mean(naive_pp) * positions:.0f}s per image")
    print(f"exact map's strongest drop on the lesion: {sum(exact_hits)}/{len(exact_hits)}")
    header = (f"{'tau':>6} {'drill':>5} {'positions':>9} {'s/image':>8} {'speedup':>8} {'theory':>7} "
              f"{'SSIM mean':>9} {'min':>6} {'>=' + format(args.target, 'g'):>6} "
              f"{'span: min':>9} {'>=' + format(args.target, 'g'):>6} {'drop kept':>9} {'min':>5} "
              f"{'on lesion':>9}")
    print(header)
    print("-" * len(header))
    table = []
    for tau, use_dd in configs:
        row = rows[(tau, use_dd)]
        # Median over images of (extrapolated naive time / measured time): other
        # processes on a shared CPU make single runs noisy.
        measured = statistics.median(pp * positions / t for pp, t in zip(naive_pp, row["seconds"]))
        theo = theory[tau] * (expected_dd if use_dd else 1.0)
        ssim = np.array(row["ssim"])
        frac = float((ssim >= args.target - 1e-9).mean())
        strict = np.array(row["ssim_span"])
        strict_frac = float((strict >= args.target - 1e-9).mean())
        kept = np.array(row["kept"])
        kept = kept[np.isfinite(kept)] if np.isfinite(kept).any() else np.array([np.nan])
        mark = ("*" if abs(tau - round(tuned.tau, 3)) < 1e-9 else " ") + \
            ("g" if abs(tau - round(guarded, 3)) < 1e-9 else " ")
        print(f"{tau:5.3f}{mark}{'on' if use_dd else 'off':>5} {statistics.mean(row['positions']):9.0f} "
              f"{statistics.mean(row['seconds']):8.2f} {measured:7.1f}x {theo:6.1f}x "
              f"{ssim.mean():9.4f} {ssim.min():6.3f} {frac:6.0%} {strict.min():9.3f} {strict_frac:6.0%} "
              f"{kept.mean():9.2f} {kept.min():5.2f} "
              f"{sum(row['hit']):>7}/{len(row['hit'])}")
        table.append({"tau": tau, "drill_down": use_dd, "positions_run": statistics.mean(row["positions"]),
                      "seconds_per_image": statistics.mean(row["seconds"]), "speedup": measured,
                      "theoretical": theo, "ssim_mean": float(ssim.mean()), "ssim_min": float(ssim.min()),
                      "frac_ssim_ok": frac, "ssim_span_min": float(strict.min()),
                      "frac_ssim_span_ok": strict_frac, "drop_kept_mean": float(kept.mean()),
                      "drop_kept_min": float(kept.min()), "on_lesion": sum(row["hit"]) / len(row["hit"])})
    print("(* = tuned tau (SSIM fit, the paper's rule); g = tau with the drop-kept guard; "
          "speedup = median over images of extrapolated naive time / measured time; "
          "theory = theoretical_speedup(tau) x eq. 46 with drill-down; SSIM with L = 1, the range of "
          "a probability; span: the stricter SSIM with L = the exact map's own max - min; drop kept: "
          "fraction of the exact map's strongest drop the map keeps there, over maps with a drop > 0.02)")
    return {"arch": arch, "size": size, "accuracy": info.get("accuracy"), "tuned_tau": tuned.tau,
            "guarded_tau": guarded, "tune_drop_kept": tuned.drop_kept.tolist(),
            "tune_ssims": tuned.ssims.tolist(), "tune_taus": list(tuned.taus),
            "naive_ms_per_position": statistics.mean(naive_pp) * 1e3,
            "exact_on_lesion": sum(exact_hits) / len(exact_hits), "rows": table}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vgg16,resnet18,inception_v3")
    p.add_argument("--images", type=int, default=6, help="held-out images per model")
    p.add_argument("--tune-images", type=int, default=8)
    p.add_argument("--naive-positions", type=int, default=96,
                   help="positions naive occlusion is timed on per image (extrapolated)")
    p.add_argument("--taus", default="1.0,0.9,0.8,0.7,0.6,0.5,0.4")
    p.add_argument("--target", type=float, default=0.9, help="target SSIM")
    p.add_argument("--min-drop-kept", type=float, default=0.8,
                   help="guard reported next to the SSIM-tuned tau (krypton_fx.tune(min_drop_kept=))")
    p.add_argument("--r", type=float, default=0.1, help="drill-down fraction")
    p.add_argument("--stage1-stride", type=int, default=8,
                   help="stage-one stride in pixels (16 misses lesions smaller than the patch)")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="directory for tuning plots and results.json")
    args = p.parse_args(argv)
    args.taus = [float(t) for t in args.taus.split(",")]
    torch.set_num_threads(args.threads)
    results = [run_model(arch.strip(), args) for arch in args.models.split(",") if arch.strip()]
    if args.out:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
