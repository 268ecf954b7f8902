"""``krypton-fx speedup``: the theoretical speedup (eqs. 16-20) and the per-node report of a model."""

from __future__ import annotations

from ..models import input_channels, is_file_name, load_model
from . import options as opt
from .targets import target_class

__all__ = ["add_parser", "run"]


def add_parser(sub, formatter_class):
    p = sub.add_parser("speedup", help="theoretical speedup and per-node report", formatter_class=formatter_class,
                       description="Print the theoretical speedup (eqs. 16-20) and the per-node table.")
    p.add_argument("--model", required=True, metavar="NAME|module:callable|file.pt",
                   help="as for explain; built with random weights (they do not change the count)")
    p.add_argument("--size", type=opt.positive_int, default=224, metavar="N", help="input height and width")
    p.add_argument("--patch", type=opt.int_or_pair, default=16, metavar="N|HxW", help="occlusion patch size")
    p.add_argument("--tau", type=opt.tau, default=1.0, help="projective-field threshold; 1 is exact")
    p.add_argument("--target", type=target_class, metavar="class:N",
                   help="a segmentation model (dense output) explained with --target class:N")
    p.add_argument("--norm-stats", choices=("exact", "frozen"), default="exact",
                   help="instance/group/layer norms: exact (dense) or frozen (point ops, approximate)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..explainer import compile as compile_explainer
    from ..report import theoretical_speedup

    patch = opt.pair(args.patch)
    opt.check_patch(patch, (args.size, args.size))
    loaded = load_model(args.model, "none" if ":" not in args.model and not is_file_name(args.model)
                        else None, seed=0)
    channels = input_channels(loaded.model)
    size_hw = (args.size, args.size)
    target = None
    if args.target is not None:
        import torch

        from ..targets import SegmentationTarget

        with torch.no_grad():
            out = loaded.model.eval()(torch.zeros(1, channels or 3, *size_hw))
        target = SegmentationTarget(args.target, key="out" if isinstance(out, dict) and "out" in out else None)
    ratio = theoretical_speedup(loaded.model, size_hw, patch, tau=args.tau, channels=channels, target=target,
                                norm_stats=args.norm_stats)
    # Patch sizes are the same for every position, so one position per patch width is enough
    # for the report: stride = patch keeps compiling cheap.
    ex = compile_explainer(loaded.model, patch=patch, stride=patch, image_size=size_hw, tau=args.tau,
                           device="cpu", channels=channels, target=target, norm_stats=args.norm_stats)
    print(f"{loaded.name}: {size_hw[0]}x{size_hw[1]} input, patch {patch[0]}x{patch[1]}, tau {args.tau:g}")
    print(f"theoretical speedup: {ratio:.4f}")
    print()
    print(ex.report())
    return 0
