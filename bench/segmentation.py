"""Segmentation nets: exact incremental occlusion with a SegmentationTarget vs naive, side by side.

MONAI's UNet (batch norm, no residual units) 2-D at 256^2 and 512^2, BasicUNet (batch norm)
2-D at 256^2 and 3-D at 96^3, UNet (batch norm, two residual units) 3-D at 96^3,
torchvision's DeepLabV3-ResNet50 at 224 (patch 16, stride 8), and an instance-norm
BasicUNet with norm_stats="frozen" (approximate), all random init. For each: one process,
the same block of centre positions (every position costs about the same) and the same
batch, naive (full forwards, the same reduction over the same mask) and incremental timed
in interleaved rounds, the minimum of each kept. Prints the measured ratio next to
theoretical_speedup(target=...) (eqs. 16-20, conv MACs, the patch at the centre), the conv
multiply-add ratio the incremental graph executes, peak memory on CUDA, and the largest
difference of the two maps (against naive with the same frozen statistics for the
frozen case, so that it measures the engine, not the approximation).

    python bench/segmentation.py                          # CPU, one thread
    python bench/segmentation.py --cases unet2d@256 --profile
    python bench/segmentation.py --device cuda --cases unet3d@96 --batch-size-3d 16 --positions-3d 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# bench/monai.py sits beside this script: keep `import monai` from finding it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import krypton_fx  # noqa: E402
from krypton_fx import geometry as geo  # noqa: E402
from krypton_fx.benchmark import peak_memory, reset_peak_memory, split_breakdown, time_breakdown  # noqa: E402
from krypton_fx.ops import occlude_window  # noqa: E402
from krypton_fx.passes.norms import freeze_norms  # noqa: E402
from krypton_fx.report import conv_macs  # noqa: E402
from krypton_fx.targets import reduce_dense, select_output  # noqa: E402
from krypton_fx.tracing import trace  # noqa: E402

CASES = "unet2d@256,unet2d@512,basicunet2d@256,basicunet3d@96,unet3d@96,deeplabv3@224,basicunet2d-frozen@256"


def _bn_stats(model: nn.Module) -> nn.Module:
    """Random running statistics, so that batch norms are not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def build(case: str) -> tuple[nn.Module, tuple[int, ...], int, dict]:
    """``(model, spatial size, channels, compile settings)`` of ``NAME@SIZE``."""
    from monai.networks import nets

    arch, _, size = case.partition("@")
    s = int(size)
    torch.manual_seed(0)
    if arch == "unet2d":
        return _bn_stats(nets.UNet(2, 1, 2, (16, 32, 64, 128), (2, 2, 2), num_res_units=0, norm="batch")), (s, s), 1, {}
    if arch == "unet3d":
        model = nets.UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch")
        return _bn_stats(model), (s, s, s), 1, {}
    if arch in ("basicunet2d", "basicunet3d"):
        dims = 2 if arch == "basicunet2d" else 3
        return _bn_stats(nets.BasicUNet(dims, 1, 2, norm="batch")), (s,) * dims, 1, {}
    if arch == "basicunet2d-frozen":
        return nets.BasicUNet(2, 1, 2).eval(), (s, s), 1, {"norm_stats": "frozen"}
    if arch == "deeplabv3":
        import torchvision

        model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                     num_classes=21, aux_loss=False)
        return _bn_stats(model), (s, s), 3, {"key": "out"}
    raise SystemExit(f"segmentation.py: error: unknown case {case!r} ({CASES})")


def measure(model, image, ex, positions: int, batch: int, device) -> dict:
    """Naive and incremental over the same centre positions, one after the other."""
    size = tuple(image.shape[1:])
    total = ex.positions
    count = min(positions, total)
    start = max(0, total // 2 - count // 2)
    pos = torch.arange(start, start + count)
    *starts, _ = geo.occlusion_grid(size, ex.patch, ex.stride)
    table = torch.stack([torch.zeros_like(s) for s in starts] + starts, 1)[pos].to(device)
    t = ex.settings.target
    with torch.no_grad():
        output, stored = ex.prepare(image)
        resolved = ex.resolve(output)
        inputs = stored + list(resolved.inputs)
        maps, totals = resolved.inputs
        frozen = _frozen_runner(model, ex, image) if ex.settings.norm_stats == "frozen" else None

        def run_naive(lo: int):
            x = occlude_window(image[None], ex.color, table[lo:lo + batch], size, ex.patch, backend="torch")
            out = frozen(x) if frozen is not None else select_output(model(x.contiguous()), t.key)
            return reduce_dense(out, maps, totals, t.category, t.output)[:, 0]

        reset_peak_memory(device)
        t0 = time.perf_counter()
        naive = torch.cat([run_naive(lo).cpu() for lo in range(0, count, batch)])
        _sync(device)
        naive_s = time.perf_counter() - t0
        naive_peak = peak_memory(device)
        reset_peak_memory(device)
        t0 = time.perf_counter()
        inc = ex.run_program(pos, inputs, resolved, batch)[:, 0]
        _sync(device)
        inc_s = time.perf_counter() - t0
        inc_peak = peak_memory(device)
    return {"naive_s": naive_s, "incremental_s": inc_s, "naive_peak": naive_peak, "incremental_peak": inc_peak,
            "max_abs_diff": float((naive - inc).abs().max()), "positions": count}


def _frozen_runner(model, ex, image):
    """The model with its norms frozen at ``image``'s statistics, as full forwards (the naive side of
    the frozen case)."""
    gm = trace(model)
    freeze_norms(gm)
    from krypton_fx.passes.norms import norm_statistics

    captured = {}
    stats_nodes = [n for n in gm.graph.nodes if n.target is norm_statistics]
    interp = torch.fx.Interpreter(gm)
    original = interp.run_node

    def record(n):
        v = original(n)
        if n in stats_nodes:
            captured[n] = v
        return v
    interp.run_node = record
    with torch.no_grad():
        interp.run(image[None])
    for n in stats_nodes:  # every later batch uses the unoccluded image's statistics
        gm.register_buffer(f"_frozen_{n.name}", captured[n])
        with gm.graph.inserting_before(n):
            const = gm.graph.get_attr(f"_frozen_{n.name}")
        n.replace_all_uses_with(const)
        gm.graph.erase_node(n)
    gm.recompile()
    return lambda x: select_output(gm(x.contiguous()), ex.settings.target.key)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=CASES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the machine is shared)")
    p.add_argument("--batch-size", type=int, default=32, help="positions per batch (2-D)")
    p.add_argument("--positions", type=int, default=64, help="centre positions timed (2-D)")
    p.add_argument("--batch-size-3d", type=int, default=4, help="positions per batch (3-D)")
    p.add_argument("--positions-3d", type=int, default=8, help="centre positions timed (3-D)")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the minimum of each side is kept")
    p.add_argument("--profile", action="store_true", help="also break the incremental time down by op")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("segmentation.py: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} thread(s))"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch_size} (3-D {args.batch_size_3d}); "
          f"{args.rounds} interleaved rounds "
          f"(min of each); patch {args.patch}, stride {args.stride}; target: mean P(class 1) over a fixed mask")
    print(f"{'case':22s} {'naive s':>8s} {'krypton s':>9s} {'speedup':>8s} {'theory':>7s} {'% theory':>8s} "
          f"{'exec MAC':>8s} {'naive MiB':>9s} {'kfx MiB':>8s} {'maxdiff':>8s}  output")
    results = []
    for case in args.cases.split(","):
        model, size, channels, extra = build(case)
        model = model.to(device)
        key = extra.pop("key", None)
        image = torch.randn(channels, *size, generator=torch.Generator().manual_seed(0)).to(device)
        mask = torch.zeros(size, dtype=torch.bool)
        mask[tuple(slice(n // 4, 3 * n // 4) for n in size)] = True  # the centre half of each axis
        target = krypton_fx.SegmentationTarget(1, mask=mask.to(device), key=key)
        norm_stats = extra.get("norm_stats", "exact")
        batch = args.batch_size if len(size) < 3 else args.batch_size_3d
        positions = args.positions if len(size) < 3 else args.positions_3d
        ex = krypton_fx.compile(model, patch=args.patch, stride=args.stride, image_size=size, channels=channels,
                                batch_size=batch, device=device, target=target, norm_stats=norm_stats)
        best = None
        for _ in range(args.rounds + 1):  # the first round warms up, untimed
            m = measure(model, image, ex, positions, batch, device)
            if best is None:
                best = dict(m, naive_s=float("inf"), incremental_s=float("inf"))
                continue
            best.update(naive_s=min(best["naive_s"], m["naive_s"]), incremental_s=min(best["incremental_s"],
                                                                                        m["incremental_s"]),
                        naive_peak=m["naive_peak"], incremental_peak=m["incremental_peak"])
        theory = krypton_fx.theoretical_speedup(model, size, args.patch, channels=channels, target=target,
                                                norm_stats=norm_stats)
        full, executed = conv_macs(ex.graph_module)
        out = next(n for n in ex.graph_module.graph.nodes if n.op == "output").meta["krypton_patch"].state.value
        speedup = best["naive_s"] / best["incremental_s"]
        mib = (lambda v: "n/a" if v is None else f"{v / 2**20:.0f}")
        row = {"case": case, "size": size, "patch": args.patch, "stride": args.stride, "batch_size": batch,
               **best, "speedup": speedup, "theoretical": theory, "executed_ratio": full / max(executed, 1),
               "output": out, "norm_stats": norm_stats, "device": name}
        print(f"{case:22s} {best['naive_s']:8.2f} {best['incremental_s']:9.2f} {speedup:7.2f}x {theory:7.2f} "
              f"{speedup / theory:8.0%} {row['executed_ratio']:8.2f} {mib(best['naive_peak']):>9s} "
              f"{mib(best['incremental_peak']):>8s} {best['max_abs_diff']:8.1e}  {out}", flush=True)
        if args.profile:
            output, stored = ex.prepare(image)
            resolved = ex.resolve(output)
            cats = time_breakdown(ex, image, best["positions"], batch, inputs=stored + list(resolved.inputs),
                                  keep=resolved)
            row["breakdown_s"], shares = split_breakdown(cats)
            print("    incremental time: " + shares, flush=True)
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
