"""Approximate maps that keep the peak, on trained lesion models: tuning, speed and what a reader sees.

For each model (narrow VGG16 / ResNet18 / InceptionV3 with torchvision's layer
geometry, trained by ``krypton_fx.lesions``, cached outside the repository), the
script

1. tunes on ``--tune-images`` lesion images (seed 100): ``krypton_fx.tune`` picks
   a covering drill-down (stage-one step, stage two's ``r``, the peak rule's
   margin) that keeps every sample's peak at the least cost (and tau, if
   ``--taus`` is given: every image must keep 95 % of its drop at its cell);
2. on ``--images`` held-out lesion images (seed 200, never used for tuning or
   training) runs, one image at a time and side by side: naive occlusion (timed
   on ``--naive-positions`` centre positions, before and after the image's other
   runs, the faster of the two extrapolated per position to the full grid), the
   exact map, the tuned drill-down, the tuned tau map (if tuned below 1), and the
   paper's drill-down (sampled stage one at 8 px, r = 0.1, no peak rule) for
   contrast;
3. prints one row per mode: positions run, seconds per image, speedup vs naive
   (median over images of the paired ratios), drop kept (min, mean), whether the
   strongest drop is the exact map's cell and lies on the lesion, SSIM (L = 1,
   min and mean), and for the covering drill-down on how many images the peak
   rule's assumption held (the covering occluder dropped at least 1 - margin as
   much as the patch at the exact peak), then the acceptance checks of issue 25.

Everything runs on one thread (``--threads``): the machine is shared.

Usage (from the repository root)::

    python bench/approx.py --out bench/results/approx | tee bench/results/approx/approx-cpu.txt
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
from krypton_fx.approx import DrillDown, drop_kept, heatmap_ssim, peak_kept  # noqa: E402
from krypton_fx.approx.cover import cover_index, cover_plan, stage1_explainer  # noqa: E402
from krypton_fx.approx.tune_drill import peak_ratio  # noqa: E402
from krypton_fx.ops import occlude_window  # noqa: E402

TUNE_SEED, HELD_OUT_SEED = 100, 200
#: Issue 25's speedup targets vs naive occlusion, per model.
TARGETS = {"vgg16": 30.0, "resnet18": 10.0, "inception_v3": 10.0}
MIN_DROP_KEPT = 0.95


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


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), wall seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run_model(arch: str, args) -> dict:
    size = lesions.DEFAULT_SIZE[arch]
    model = lesions.load_or_train(arch, progress=True)
    info = lesions.training_info(arch)
    print(f"\n=== {arch}-shaped lesion model at {size}x{size}: held-out accuracy "
          f"{info.get('accuracy', float('nan')):.3f} ({info.get('steps')} steps) ===", flush=True)
    bs = args.batch_size
    ex = krypton_fx.compile(model, patch=args.patch, stride=args.stride, image_size=(size, size), batch_size=bs)

    tune_images, _ = lesion_images(args.tune_images, size, TUNE_SEED)
    tuned, tune_s = timed(krypton_fx.tune, ex, tune_images, target_ssim=args.target, taus=args.taus,
                          min_drop_kept=MIN_DROP_KEPT, progress=True)
    print(tuned)
    print(f"(tuning on {len(tune_images)} images took {tune_s:.0f}s)", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        if args.taus:
            tuned.plot(os.path.join(args.out, f"tune-{arch}.png"))
    if tuned.drill_down is None:
        print("no drill-down kept every tuning image's peak: the tuned mode is exact")
    dd = tuned.drill_down
    paper = DrillDown(r=0.1, stage1_stride=8, stage1="sample", margin=None)
    modes = {"exact": (ex, None)}
    if dd is not None:
        modes["drill-down (tuned)"] = (ex, dd)
    if tuned.tau < 1.0:
        modes[f"tau {tuned.tau:.2f} (tuned)"] = (krypton_fx.compile(model, tau=tuned.tau, patch=args.patch,
                                                                    stride=args.stride, image_size=(size, size),
                                                                    batch_size=bs), None)
    modes["paper: drill-down r=0.1, s1=8, sampled"] = (ex, paper)
    held, boxes = lesion_images(args.images, size, HELD_OUT_SEED)
    for mex, mdd in modes.values():  # first-call compiles out of the timings
        mex(held[0], drill_down=mdd)
    cover = stage1_explainer(ex, cover_plan(ex, dd.stage1_step(ex.stride))) if dd is not None else None

    rows = {m: {"seconds": [], "kept": [], "peak": [], "lesion": [], "ssim": [], "positions": []} for m in modes}
    naive_pp, ratios = [], []
    for i, (image, box) in enumerate(zip(held, boxes)):
        before = naive_seconds_per_position(model, image, ex, args.naive_positions, bs)
        exact, exact_s = timed(ex, image)
        results = {"exact": (exact, exact_s)}
        for m, (mex, mdd) in modes.items():
            if m != "exact":
                results[m] = timed(mex, image, label=exact.label, drill_down=mdd)
        after = naive_seconds_per_position(model, image, ex, args.naive_positions, bs)
        naive_pp.append(min(before, after))
        for m, (res, seconds) in results.items():
            row = rows[m]
            row["seconds"].append(seconds)
            row["kept"].append(drop_kept(exact, res.heatmap))
            row["peak"].append(peak_kept(exact, res.heatmap))
            row["lesion"].append(strongest_drop_on_lesion(res.heatmap, box, res.stride, res.patch))
            row["ssim"].append(heatmap_ssim(exact.heatmap, res.heatmap))
            row["positions"].append(res.stats.get("positions_run", ex.positions))
        if cover is not None:  # the peak rule's assumption on this image (outside the timings)
            covers = cover.run_positions(torch.arange(cover.positions), cover.prepare(image)[1], exact.label)
            ratios.append(peak_ratio(exact, covers[cover_index(cover_plan(ex, dd.stage1_step(ex.stride)))], 0.02))
        print(f"[bench] {arch} image {i + 1}/{len(held)}: base {exact.base_prob:.3f}, "
              f"min {float(exact.heatmap.min()):.3f}, "
              f"naive {naive_pp[-1] * 1e3:.1f} ms/position, exact {exact_s:.1f}s, "
              + ", ".join(f"{m.split(' ')[0]} {results[m][1]:.2f}s" for m in modes if m != "exact"), flush=True)

    positions = ex.positions
    print(f"\n{arch}: {len(held)} held-out lesion images, patch {args.patch}, stride {args.stride}, {positions} "
          f"positions, batch {bs}, {args.threads} thread(s); naive timed on {args.naive_positions} centre positions "
          f"before and after each image's runs (the faster), extrapolated per position: "
          f"{statistics.mean(naive_pp) * 1e3:.1f} ms/position, {statistics.mean(naive_pp) * positions:.0f}s per image")
    if dd is not None:
        held_ok = sum(1 for r in ratios if not np.isfinite(r) or r >= 1 - dd.margin)
        print(f"tuned drill-down: stage-one stride {dd.stage1_stride} (patch "
              f"{tuple(p + (k - 1) * s for p, s, k in zip(ex.patch, ex.stride, dd.stage1_step(ex.stride)))}), "
              f"r={dd.r:g}, margin {dd.margin:g}; peak ratio on the held-out images "
              f"{', '.join(f'{r:.2f}' for r in ratios)}: the assumption held on {held_ok}/{len(ratios)}")
    header = (f"{'mode':<40} {'positions':>9} {'s/image':>8} {'speedup':>8} {'kept min':>8} {'mean':>5} "
              f"{'peak cell':>9} {'on lesion':>9} {'SSIM min':>8} {'mean':>6}")
    print(header)
    print("-" * len(header))
    table = []
    for m in modes:
        row = rows[m]
        speedup = statistics.median(pp * positions / t for pp, t in zip(naive_pp, row["seconds"]))
        kept = np.array(row["kept"])
        voting = np.isfinite(kept)
        kmin = float(kept[voting].min()) if voting.any() else float("nan")
        kmean = float(kept[voting].mean()) if voting.any() else float("nan")
        peaks = int(np.nansum(row["peak"]))
        ssim = np.array(row["ssim"])
        n = len(row["kept"])
        print(f"{m:<40} {statistics.mean(row['positions']):9.0f} {statistics.mean(row['seconds']):8.2f} "
              f"{speedup:7.1f}x {kmin:8.3f} {kmean:5.3f} {peaks:>6}/{int(voting.sum()):<2} "
              f"{sum(row['lesion']):>6}/{n:<2} {ssim.min():8.3f} {ssim.mean():6.3f}")
        table.append({"mode": m, "positions_run": statistics.mean(row["positions"]),
                      "seconds_per_image": statistics.mean(row["seconds"]), "speedup": speedup,
                      "drop_kept_min": kmin, "drop_kept_mean": kmean, "peak_cell": peaks, "images": n,
                      "on_lesion": sum(row["lesion"]), "ssim_min": float(ssim.min()),
                      "ssim_mean": float(ssim.mean()), "drop_kept": row["kept"], "ssims": row["ssim"]})
    print("(speedup: median over images of extrapolated naive time / measured time, one thread; drop kept: "
          "fraction of the exact map's strongest drop kept at its cell, over maps with a drop > 0.02; peak cell: "
          "the strongest drop at the exact map's cell; on lesion: the strongest drop's patch overlaps the lesion)")
    checks = {}
    if dd is not None:
        row = next(t for t in table if t["mode"] == "drill-down (tuned)")
        exact_lesion = next(t for t in table if t["mode"] == "exact")["on_lesion"]
        checks = {"peak on lesion where the exact map's is": row["on_lesion"] >= exact_lesion,
                  f"drop kept >= {MIN_DROP_KEPT:g} on every image": row["drop_kept_min"] >= MIN_DROP_KEPT,
                  f"speedup >= {TARGETS.get(arch, 10):g}x": row["speedup"] >= TARGETS.get(arch, 10)}
        print(f"acceptance ({arch}, tuned drill-down): "
              + "; ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    return {"arch": arch, "size": size, "accuracy": info.get("accuracy"), "tuned_tau": tuned.tau,
            "drill_down": None if dd is None else {"r": dd.r, "stage1_stride": dd.stage1_stride, "margin": dd.margin},
            "tune_trials": [t.__dict__ for t in tuned.drill_down_trials], "tune_seconds": tune_s,
            "held_out_peak_ratios": ratios, "naive_ms_per_position": statistics.mean(naive_pp) * 1e3,
            "rows": table, "checks": {k: bool(v) for k, v in checks.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vgg16,resnet18,inception_v3")
    p.add_argument("--images", type=int, default=6, help="held-out images per model")
    p.add_argument("--tune-images", type=int, default=8)
    p.add_argument("--naive-positions", type=int, default=96,
                   help="positions naive occlusion is timed on per image (extrapolated)")
    p.add_argument("--taus", default="", help="taus to tune tau on too (comma-separated; default: none)")
    p.add_argument("--target", type=float, default=0.9, help="target SSIM")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="directory for results.json (and tuning plots)")
    args = p.parse_args(argv)
    args.taus = tuple(float(t) for t in args.taus.split(",") if t.strip())
    torch.set_num_threads(args.threads)
    results = [run_model(arch.strip(), args) for arch in args.models.split(",") if arch.strip()]
    if args.out:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
