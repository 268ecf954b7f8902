"""``krypton-fx explain FILES_DIRS_GLOBS... --out-dir OUT``: many images into a folder.

Per image ``OUT/<stem>.png`` and ``OUT/<stem>.npy``, and ``OUT/summary.csv``
with one row per image (:mod:`krypton_fx.scale.outputs` has the contract:
atomic writes, stable names for equal stems, resumption). A bad image is a
row with status ``error`` and the others go on; the exit status is then 1,
with a one-line count on stderr. Workers: one on ``--device``, one per
device of ``--devices``, or Ray actors with ``--ray``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Optional

from ..models import input_channels, load_model
from ..monai_nets import is_monai_spec
from ..scale.devices import parse_devices, run_on_devices
from ..scale.files import FileJob
from ..scale.imagefiles import expand_inputs
from ..scale.outputs import OutputFolder
from . import options as opt
from .errors import PROG, CLIError, native_stderr_to, warn
from .explain_segments import SegmentLabeler, refuse_patch_options
from .files import output_dir
from .images import ImageReader, preprocessing_for
from .targets import segmentation_target

__all__ = ["run_files", "fingerprint"]


def fingerprint(args, patch, stride) -> dict:
    """The settings that make a map: an output made with other ones is not reused."""
    drill = None if args.drill_down is None else [args.drill_down, args.stage1_stride, args.stage1, args.margin]
    settings = {"model": args.model, "weights": args.weights, "num_classes": args.num_classes,
                "seed": args.seed if (args.weights or "").lower() == "none" else None,
                "size": args.size, "mean": args.mean, "std": args.std, "patch": list(patch),
                "stride": list(stride), "color": args.color, "label": args.label, "tau": args.tau,
                "output": args.output, "drill_down": drill}
    if getattr(args, "in_channels", None) is not None:  # only when given: older folders' settings stay equal
        settings["in_channels"] = args.in_channels
    if args.tau < 1.0:  # tau maps keep their peak since issue 25: older ones are not reused
        settings["peak_margin"] = args.margin or "default"
    if getattr(args, "segments", None) is not None:
        settings.update(segments=str(args.segments), patch=None, stride=None)
    if getattr(args, "target", None) is not None:  # only with a target: older folders' settings stay equal
        settings.update(target=args.target, mask=args.mask or "predicted", reduce=args.reduce or "mean")
    if getattr(args, "norm_stats", "exact") != "exact":
        settings["norm_stats"] = args.norm_stats
    return settings


def _check_options(args) -> None:
    for option in ("out", "npy"):
        if getattr(args, option) is not None:
            raise CLIError(f"--{option} writes one image's output; with --out-dir every image gets "
                           f"DIR/<stem>.png and DIR/<stem>.npy: drop --{option}")
    if args.devices is not None and args.device is not None:
        raise CLIError("give --device or --devices, not both")
    if args.ray is not None and args.devices is not None:
        raise CLIError("--ray places the workers on the cluster's devices; drop --devices (or --ray)")
    if args.workers is not None and args.ray is None:
        raise CLIError("--workers sets the number of Ray workers; add --ray auto (or use --devices)")


def run_files(args) -> int:
    _check_options(args)
    if args.segments is not None:
        refuse_patch_options(args)
        patch, stride, drill = (1, 1), (1, 1), None
    else:
        patch, stride, drill = opt.check_settings(args)
    try:
        devices = parse_devices(args.devices) if args.devices else [opt.resolve_device(args.device)]
    except ValueError as e:
        raise CLIError(str(e)) from None
    paths, notes = expand_inputs(args.image, exclude=args.out_dir)
    for note in notes:
        warn(note)
    if not paths:
        raise CLIError(f"no input files in {' '.join(args.image)}; give image files, folders or globs")

    with output_dir(args.out_dir, "--out-dir") as out:
        folder = OutputFolder(out, fingerprint(args, patch, stride), overwrite=args.overwrite)
        folder.clean_temporaries()
        tasks, todo, done = folder.plan([str(p) for p in paths])
        rows = dict(done)
        where = f"Ray ({args.ray})" if args.ray else ", ".join(map(str, devices))
        start = time.perf_counter()
        ray_logs = None
        try:
            if todo:
                job = _job(args, out, folder.fingerprint, patch, stride, drill, todo)
                if args.ray is not None:
                    ray_logs = _run_on_ray(job, todo, args, rows, len(tasks), len(done))
                else:
                    _collect(run_on_devices(job, todo, devices), rows, len(tasks), len(done))
        finally:  # interrupted or not, the summary lists what is done
            summary = folder.write_summary([rows[t.index] for t in tasks if t.index in rows])
    seconds = time.perf_counter() - start
    failed = sum(r["status"] == "error" for r in rows.values())
    made = sum(r["status"] == "ok" for r in rows.values())
    print(f"{len(tasks)} images: {made} explained, {len(done)} complete from an earlier run, {failed} failed "
          f"({seconds:.1f} s on {where})")
    print(f"wrote {summary}")
    if ray_logs is not None:
        print(f"Ray's own logs: {ray_logs}")
    if failed:
        print(f"{PROG}: {failed} of {len(tasks)} images failed; see the error column of {summary}",
              file=sys.stderr, flush=True)
        return 1
    return 0


def _job(args, out: Path, settings: dict, patch, stride, drill, todo) -> FileJob:
    """Load the model, check it on the first readable image, and describe the work for the workers."""
    import torch

    monai = is_monai_spec(args.model)
    loaded = load_model(args.model, args.weights, args.num_classes, args.seed,
                        spatial_dims=2 if monai else None,
                        in_channels=(args.in_channels or 3) if monai else args.in_channels)
    channels = input_channels(loaded.model)
    prep = preprocessing_for(loaded.weights, args.size, args.mean, args.std, channels)
    reader = ImageReader(prep, channels, args.color)
    target = None
    for task in todo:  # the first image that reads: a model that cannot run on it fails now, once
        try:
            x, _, _ = reader(task.path)
        except ValueError:
            continue
        if args.segments is None:
            opt.check_patch(patch, tuple(x.shape[-2:]))
        # a segmentation target: checked on this image (dense output, class in range, the mask's
        # shape, or a predicted mask that is not empty); each image predicts its own mask
        target = segmentation_target(args, loaded, x, torch.device("cpu"))
        if target is None:
            opt.probe_model(loaded, x, torch.device("cpu"), args.label, args.output)
        break
    if loaded.warning:
        warn(loaded.warning)
    if args.color == "mean":
        warn("--color mean gives every image its own patch colour, so each image is compiled anew (slower)")
    compile_kwargs = dict(patch=patch, stride=stride, tau=args.tau, batch_size=args.batch_size,
                          output=args.output if target is None else "prob", channels=channels,
                          target=target, norm_stats=args.norm_stats)
    segments = None
    if args.segments is not None:  # one position of a one-pixel patch: ablate does not use the grid
        compile_kwargs.update(patch=1, stride=1 << 20)
        segments = SegmentLabeler(args.segments, prep)
    return FileJob(loaded.model.cpu(), str(out), compile_kwargs, reader=reader, label=args.label,
                   drill_down=drill, fingerprint=settings, model_name=loaded.name,
                   categories=loaded.categories, pack=True if args.pack else None, segments=segments,
                   describe_segments=str(args.segments or ""))


def _run_on_ray(job: FileJob, todo, args, rows: dict, total: int, initial: int) -> Optional[Path]:
    """Ray actors explain the images; Ray's own logs stay in its session's log folder (returned):
    its Python loggers and progress bars are quiet, and what its native core writes to this
    process's stderr goes to ``krypton-fx-driver.err`` there."""
    from ..scale.cluster import run_on_ray, start_quietly

    logs = start_quietly(args.ray)
    redirect = native_stderr_to(logs / "krypton-fx-driver.err") if logs is not None else contextlib.nullcontext()
    with redirect:
        _collect(run_on_ray(job, todo, address=args.ray, workers=args.workers), rows, total, initial)
    return logs


def _collect(results, rows: dict, total: int, initial: int) -> None:
    """Rows as the workers finish them, with one progress bar over images; errors as warnings."""
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=initial, desc=PROG, unit="image", disable=None, file=sys.stderr) as bar:
        for task, row, _ in results:
            rows[task.index] = row
            if row["status"] == "error":
                said = row["error"] if task.path in row["error"] else f"{task.path}: {row['error']}"
                bar.write(f"{PROG}: warning: {said}", file=sys.stderr)
            bar.update(1)
