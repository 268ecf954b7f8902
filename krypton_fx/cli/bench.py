"""``krypton-fx bench``: measured vs theoretical speedup over torchvision classifiers
(random init): a table on stdout, and bench.json, bench.txt and bench.png in ``--out``."""

from __future__ import annotations

import difflib
import functools
import gc
import json
import math
import re
from typing import Optional

from ..models import input_channels, torchvision_names
from . import options as opt
from .errors import CLIError, first_line
from .files import output_dir, save_figure, write_files

__all__ = ["add_parser", "run"]


def add_parser(sub, formatter_class):
    p = sub.add_parser("bench", help="measured vs theoretical speedup over torchvision models",
                       formatter_class=formatter_class,
                       description="Time naive and incremental occlusion side by side (random init).")
    p.add_argument("--models", default="all", metavar="all|NAME,...",
                   help="torchvision classifiers: all, or a comma-separated list")
    p.add_argument("--size", type=opt.positive_int, default=224, metavar="N", help="input height and width")
    p.add_argument("--patch", type=opt.int_or_pair, default=16, metavar="N|HxW", help="occlusion patch size")
    p.add_argument("--stride", type=opt.int_or_pair, default=8, metavar="N|HxW", help="patch stride")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda", help="where both runs happen")
    p.add_argument("--batch-size", type=opt.positive_int, default=32, metavar="N",
                   help="positions per batch, the same for naive and incremental")
    p.add_argument("--positions", type=opt.positions, default=64, metavar="N|all",
                   help="positions to time, around the image centre")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and image")
    p.add_argument("--out", default="krypton-bench", metavar="DIR",
                   help="folder for bench.json, bench.txt and bench.png")
    p.set_defaults(run=run)
    return p


def _bench_models(text: str) -> list[str]:
    names = torchvision_names()
    if text.strip().lower() == "all":
        return names
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    if not chosen:
        raise CLIError("--models is empty; give all or a comma-separated list such as resnet18,vgg16")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=3)
        suggestion = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise CLIError(f"unknown model(s) in --models: {', '.join(unknown)}{suggestion}; use names from "
                       "torchvision.models.list_models(module=torchvision.models) or all")
    return chosen


def _mib(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value / (1 << 20):.0f}"


def run(args) -> int:
    import platform

    import torch
    import torchvision

    from ..benchmark import measure
    from ..viz import bench_figure

    names = _bench_models(args.models)
    device = opt.resolve_device(args.device)
    patch, stride = opt.pair(args.patch), opt.pair(args.stride)
    opt.check_patch(patch, (args.size, args.size))
    with output_dir(args.out, "--out") as out_dir:
        settings = {"size": args.size, "patch": list(patch), "stride": list(stride), "device": str(device),
                    "batch_size": args.batch_size, "positions": args.positions, "seed": args.seed,
                    "weights": "random init", "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "machine": platform.machine(),
                    "threads": torch.get_num_threads()}
        width = max(len(n) for n in names) + 2
        header = (f"{'model':<{width}}{'theory':>8}{'measured':>10}{'ratio':>7}{'naive s':>9}"
                  f"{'krypton s':>11}{'naive MiB':>11}{'krypton MiB':>13}{'max |diff|':>12}")
        table = [f"krypton-fx bench: {args.size}x{args.size}, patch {patch[0]}, stride {stride[0]}, "
                 f"{device}, batch {args.batch_size}, positions {args.positions or 'all'} "
                 "around the centre, random init; ratio = measured / theory", header, "-" * len(header)]
        for line in table:
            print(line, flush=True)
        results = []
        for name in names:
            model = None
            try:
                torch.manual_seed(args.seed)
                model = torchvision.models.get_model(name, weights=None)
                image = torch.randn(input_channels(model), args.size, args.size)
                m = measure(model, image, patch=patch, stride=stride, batch_size=args.batch_size,
                            positions=args.positions, device=device)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a model that does not trace or run is a row, not a crash
                reason = re.sub(r"\s+", " ", first_line(e))
                results.append({"model": name, "status": "skipped", "reason": reason})
                line = f"{name:<{width}}skipped: {reason}"
            else:
                results.append({"model": name, "status": "ok", "theoretical": m.theoretical,
                                "speedup": m.speedup, "ratio": m.speedup / m.theoretical,
                                "naive_s": m.naive_s, "incremental_s": m.incremental_s,
                                "executed_ratio": m.executed_ratio, "naive_peak_bytes": m.naive_peak,
                                "incremental_peak_bytes": m.incremental_peak,
                                "max_abs_diff": m.max_abs_diff, "positions": m.positions,
                                "batch_size": m.batch_size})
                line = (f"{name:<{width}}{m.theoretical:>7.2f}x{m.speedup:>9.2f}x"
                        f"{m.speedup / m.theoretical:>7.0%}{m.naive_s:>9.3f}{m.incremental_s:>11.3f}"
                        f"{_mib(m.naive_peak):>11}{_mib(m.incremental_peak):>13}"
                        f"{m.max_abs_diff:>12.1e}")
            finally:
                del model
                gc.collect()
            table.append(line)
            print(line, flush=True)
        if device.type != "cuda":
            table.append("peak memory: not measured on the CPU (the process's resident peak does not fall "
                         "between the two runs, so it would show the same for both)")
            print(table[-1])
        ok = [r for r in results if r["status"] == "ok"]
        skipped = len(results) - len(ok)
        summary = f"{len(ok)} measured, {skipped} skipped"
        if ok:
            geo_mean = math.exp(sum(math.log(r["ratio"]) for r in ok) / len(ok))
            summary += f"; geometric mean of measured / theory: {geo_mean:.0%}"
        table.append(summary)
        print(summary)

        title = (f"{device}, {args.size}x{args.size}, patch {patch[0]}, stride {stride[0]}, "
                 f"batch {args.batch_size}, {args.positions or 'all'} positions")
        if skipped:
            title += f"\n{skipped} model{'s' * (skipped > 1)} skipped: see bench.txt"
        fig = bench_figure([r["model"] for r in ok], [r["theoretical"] for r in ok],
                           [r["speedup"] for r in ok], title=title)
        report = {"settings": settings, "results": results}
        files = {
            out_dir / "bench.json": lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()),
            out_dir / "bench.txt": lambda f: f.write(("\n".join(table) + "\n").encode()),
            out_dir / "bench.png": functools.partial(save_figure, fig, "png"),
        }
        write_files(files)
        for path in files:
            print(f"wrote {path}")
    return 0
