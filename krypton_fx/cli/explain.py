"""``krypton-fx explain``: its options, and an occlusion heat map of one image (``--out``); many
images into a folder (``--out-dir``) are :mod:`.explain_files`'s, a volume (NIfTI, ``.npy``)
:mod:`.explain_volume`'s."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from ..models import input_channels, load_model, model_spatial_dims
from ..monai_nets import is_monai_spec
from ..volumes import is_volume_path
from . import explain_segments
from . import options as opt
from .errors import CLIError
from .explain_files import run_files
from .explain_volume import VOLUME_ONLY, run_volume
from .files import PICTURE_FORMATS, output_file, save_figure, write_files
from .images import patch_color, preprocessing_for, read_image, to_model_mode
from .targets import add_arguments as add_segmentation_arguments
from .targets import refuse_segmentation_options, segmentation_target

__all__ = ["add_parser", "run"]


def add_parser(sub, formatter_class) -> argparse.ArgumentParser:
    p = sub.add_parser("explain", help="occlusion heat map of one image, or of many into a folder",
                       formatter_class=formatter_class,
                       description="Explain a CNN's prediction on IMAGE with an exact occlusion heat map; "
                                   "with --out-dir, on every image of the files, folders and globs given.")
    p.add_argument("image", metavar="IMAGE", nargs="+",
                   help="PNG, JPEG or TIFF file, or a volume: NIfTI (.nii, .nii.gz) or .npy (D,H,W) / "
                        "(C,D,H,W); with --out-dir any number of image files, folders and globs")
    p.add_argument("--model", required=True, metavar="NAME|monai:NAME|module:callable|file.pt",
                   help="torchvision model name (resnet18), MONAI network (monai:resnet18, "
                        "monai:DenseNet121, monai:SEResNet50, monai:efficientnet-b0; pip install "
                        "'krypton_fx[monai]'), package.module:callable returning an nn.Module, or a .pt "
                        "file with a whole pickled model (unpickling runs code from the file: use only "
                        "files you trust)")
    p.add_argument("--weights", metavar="ENUM|PATH|none",
                   help="torchvision weights (ResNet18_Weights.IMAGENET1K_V1, DEFAULT), a state-dict or "
                        "checkpoint file (read with weights_only=True: it never runs code), or none "
                        "(random init); default: DEFAULT for torchvision names, the model as built "
                        "otherwise")
    p.add_argument("--num-classes", type=opt.positive_int, metavar="N",
                   help="outputs of a torchvision model whose --weights file was fine-tuned, or of a "
                        "monai: network")
    p.add_argument("--spatial-dims", type=int, choices=(2, 3), metavar="2|3",
                   help="monai: networks: build for images (2) or volumes (3); default: 3 for a volume "
                        "input, 2 for an image")
    p.add_argument("--in-channels", type=opt.positive_int, metavar="N",
                   help="monai: networks: input channels (default: the input's, 3 for an RGB image)")
    p.add_argument("--patch", type=opt.int_or_tuple, default=16, metavar="N|HxW|DxHxW",
                   help="occlusion patch size")
    p.add_argument("--stride", type=opt.int_or_tuple, metavar="N|HxW|DxHxW",
                   help="patch stride (default 4 for images, 8 for volumes)")
    p.add_argument("--color", type=opt.color, metavar="black|gray|mean|FLOAT",
                   help="patch colour in the model's input space. Images (default gray): black and gray "
                        "are pixel values 0 and 0.5 normalised, mean the image's per-channel mean. "
                        "Volumes (default black), after --intensity: black is the volume's lowest value "
                        "(0 for minmax and window), gray halfway between its lowest and highest, mean "
                        "its mean (0 for zscore). A number is used as is")
    p.add_argument("--label", type=opt.non_negative_int, metavar="N",
                   help="class to explain (default: the predicted class)")
    p.add_argument("--labels", type=opt.label_list, metavar="N,M,...",
                   help="several classes at once, from the same occluded forwards: one picture per class, "
                        "named after --out with -CLASS added (heat-3.png); --npy holds one map per class "
                        "(images, one at a time)")
    p.add_argument("--top-k", type=opt.positive_int, metavar="K",
                   help="the K classes the image scores highest, as --labels")
    p.add_argument("--tau", type=opt.tau, default=1.0, help="projective-field threshold; 1 is exact")
    p.add_argument("--output", choices=("prob", "logit", "sigmoid"), default="prob",
                   help="what the map records: the softmax probability of the label, or its raw logit "
                        "(with --target also sigmoid: the class's own sigmoid)")
    p.add_argument("--drill-down", type=opt.fraction, metavar="R", nargs="?", const=opt.DRILL_DOWN_R,
                   help="adaptive drill-down: a coarse pass at --stage1-stride whose patches contain every "
                        "--patch, then --stride on the fraction R of cells with the largest drop (default "
                        f"{opt.DRILL_DOWN_R:g}), then exactly wherever the strongest drop may lie "
                        "(approximate; default off)")
    p.add_argument("--stage1-stride", type=opt.positive_int, metavar="N",
                   help=f"coarse stride of --drill-down in pixels (default: {opt.STAGE1_STEP} x --stride)")
    p.add_argument("--stage1", choices=("cover", "sample"),
                   help="--drill-down's coarse pass: cover (patches that contain every fine patch: a drop cannot "
                        "fall between them; the default) or sample (the paper's: every few cells, interpolated)")
    p.add_argument("--margin", type=opt.margin, metavar="M|none",
                   help="--tau and --drill-down: recompute exactly every cell whose approximate drop may reach "
                        "(1 - M) x the strongest exact drop (default 0.5; none: no such rule, the paper's maps)")
    p.add_argument("--device", metavar="cpu|cuda", help="default: cuda if available, else cpu")
    p.add_argument("--batch-size", type=opt.positive_int, metavar="N",
                   help="positions per batch (default: what fits in memory)")
    p.add_argument("--size", type=opt.positive_int, metavar="N",
                   help="model input size: resize the shorter side to N, centre-crop NxN (default 224, "
                        "or the weights' own crop size)")
    p.add_argument("--mean", type=opt.finite_float, nargs="+", metavar="M",
                   help="per-channel normalisation mean (default ImageNet's, or the weights' own)")
    p.add_argument("--std", type=opt.finite_float, nargs="+", metavar="S",
                   help="per-channel normalisation std (default ImageNet's, or the weights' own)")
    p.add_argument("--segments", type=explain_segments.segment_spec,
                   metavar="slic:N|felzenszwalb:SCALE|file:LABELS",
                   help="feature ablation instead of a sliding patch: ablate each segment (about N SLIC "
                        "superpixels, Felzenszwalb's segments at SCALE, or a label image / NIfTI label "
                        "volume) with --color; the picture shows the outlines and each segment's drop, "
                        "--npy the per-segment scores")
    p.add_argument("--out", metavar="PNG", help="picture to write (one IMAGE; default heat.png)")
    p.add_argument("--npy", metavar="NPY", help="also write the raw heat map (numpy .npy; one IMAGE)")
    vol = p.add_argument_group("volumes (NIfTI .nii/.nii.gz, .npy)")
    vol.add_argument("--intensity", type=opt.intensity, metavar="none|minmax|zscore|window:LO,HI",
                     help="intensity scaling before the model, over the whole volume: none (as stored, the "
                          "default), minmax (to [0, 1]), zscore (mean 0, std 1), window:LO,HI (clip to "
                          "[LO, HI], then to [0, 1]; a CT window in HU, say)")
    vol.add_argument("--map", metavar="NII|NPY",
                     help="the map on the input's voxel grid: the drop in P(label) when the patch around "
                          "each voxel is occluded (trilinear between patch centres); .nii/.nii.gz with the "
                          "input's affine and header, or .npy (default: --out's name with -map.nii.gz for a "
                          "NIfTI input, -map.npy for a .npy one: heat-map.nii.gz)")
    add_segmentation_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of random initialisation (--weights none)")
    many = p.add_argument_group("many images (--out-dir)")
    many.add_argument("--out-dir", metavar="DIR",
                      help="explain every IMAGE (files, folders, globs) into DIR: <stem>.png, <stem>.npy "
                           "and summary.csv; a rerun skips complete images")
    many.add_argument("--overwrite", action="store_true", help="redo images whose outputs are complete")
    many.add_argument("--pack", action="store_true",
                      help="small images share batches with no bit check, their unoccluded passes batched "
                           "too (a little faster; each map equals one image's run up to float rounding, not "
                           "bit for bit; by default they share batches where the bits stay the same)")
    many.add_argument("--devices", metavar="all|cuda:0,cuda:1|cpu",
                      help="one worker per device over a shared queue (instead of --device)")
    many.add_argument("--ray", metavar="auto|ADDRESS",
                      help="run the workers on a Ray cluster (pip install 'krypton_fx[ray]'): auto joins "
                           "the running cluster or starts a local one. Ray's own logs stay out of the terminal, "
                           "in its session's log folder (/tmp/ray/session_latest/logs by default, or under "
                           "the cluster's --temp-dir; the run prints where): the workers' output in "
                           "worker-*.out/.err, Ray Data's in ray-data/, what Ray's core says in this process "
                           "in krypton-fx-driver.err")
    many.add_argument("--workers", type=opt.positive_int, metavar="N",
                      help="Ray workers (default: one per GPU of the cluster, else 2)")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    if args.out_dir is not None:
        volumes = [name for name in args.image if is_volume_path(name)]
        if volumes:
            raise CLIError(f"--out-dir explains images; {volumes[0]} is a volume: explain volumes one at a "
                           "time with --out and --map")
        _refuse_volume_options(argparse.Namespace(**{**vars(args), "image": "each input"}))
        refuse_segmentation_options(args)
        if args.labels is not None or args.top_k is not None:
            raise CLIError("--labels and --top-k explain one image (--out); with --out-dir give --label or none")
        args.color = "gray" if args.color is None else args.color
        return run_files(args)
    for option in ("devices", "ray", "workers"):
        if getattr(args, option) is not None:
            raise CLIError(f"--{option} works with --out-dir DIR (many images); add --out-dir")
    if args.overwrite:
        raise CLIError("--overwrite works with --out-dir DIR; --out and --npy are always overwritten")
    if args.pack:
        raise CLIError("--pack works with --out-dir DIR (many images share batches); add --out-dir")
    if args.labels is not None or args.top_k is not None:  # (--out-dir: one class an image, as its files)
        if len(args.image) == 1 and is_volume_path(args.image[0]):
            raise CLIError("--labels and --top-k explain images; explain a volume one class at a time (--label)")
    if len(args.image) > 1:
        raise CLIError(f"{len(args.image)} images given but --out writes one picture; use --out-dir DIR "
                       "for many images")
    args.image = args.image[0]
    if is_volume_path(args.image):
        return run_volume(args)
    _refuse_volume_options(args)
    return _explain_one(args)


def _refuse_volume_options(args) -> None:
    for option in VOLUME_ONLY:
        if getattr(args, option.lstrip("-").replace("-", "_")) is not None:
            raise CLIError(f"{option} applies to volumes (.nii, .nii.gz, .npy); {args.image} is an image")
    if args.color is None:
        args.color = "gray"
    if not is_monai_spec(args.model):
        return
    if args.spatial_dims == 3:
        raise CLIError(f"--model {args.model} --spatial-dims 3 takes volumes, but {args.image} is a 2-D image; "
                       "give a .nii, .nii.gz or .npy volume, or --spatial-dims 2")


def _explain_one(args) -> int:
    import numpy as np

    segmenting = args.segments is not None
    if segmenting:
        explain_segments.refuse_patch_options(args)
        patch = stride = drill = None
    else:
        patch, stride, drill = opt.check_settings(args)
    out_png = output_file(args.out or "heat.png", "--out", PICTURE_FORMATS, inputs=[args.image])
    out_npy = output_file(args.npy, "--npy", inputs=[args.image], example="heat.npy") if args.npy else None
    if out_npy is not None and out_npy.resolve() == out_png.resolve():
        raise CLIError("--out and --npy name the same file; give them different names")
    picture = read_image(args.image)
    device = opt.resolve_device(args.device)
    monai = is_monai_spec(args.model)
    loaded = load_model(args.model, args.weights, args.num_classes, args.seed,
                        spatial_dims=2 if monai else None,
                        in_channels=(args.in_channels or 3) if monai else args.in_channels)
    model = loaded.model
    if model_spatial_dims(model) == 3:
        raise CLIError(f"{loaded.name} takes volumes (its first convolution is 3-D), but {args.image} is a 2-D "
                       "image; give a .nii, .nii.gz or .npy volume")
    channels = input_channels(model)
    prep = preprocessing_for(loaded.weights, args.size, args.mean, args.std, channels)
    x = prep.transform(to_model_mode(picture, channels))
    size_hw = tuple(x.shape[-2:])
    if not segmenting:
        opt.check_patch(patch, size_hw)
    target = None if segmenting else segmentation_target(args, loaded, x, device)
    if target is None:
        opt.probe_model(loaded, x, device, args.label, args.output, args.labels or ())

    color = patch_color(args.color, x, prep.mean, prep.std)
    if segmenting:
        return explain_segments.ablate_one(args, loaded, x, prep, color, picture, device, channels, out_png,
                                           out_npy)
    ex, res, seconds = opt.compile_and_explain(loaded, x, args, patch, stride, color, size_hw, channels, device,
                                               drill, target)

    from ..viz import heatmap_figure, target_label

    cats = loaded.categories
    exact = opt.exactness(args, drill, res)
    several = len(res.labels) > 1
    writers = {}
    for label, base, heatmap in zip(res.labels, res.base_probs, res.heatmaps):
        heat = heatmap.numpy()
        label_name = cats[label] if cats and label < len(cats) else None
        if target is not None:
            label_name = target_label(target, res.mask)
        fig = heatmap_figure(prep.display(x), heat, res.patch, res.stride, label, base,
                             label_name=label_name, output=res.output, exact_cells=res.stats.get("exact_cells"),
                             subtitle=(f"{loaded.name}, {Path(args.image).name}: patch {patch[0]}x{patch[1]}, "
                                       f"stride {stride[0]}x{stride[1]}, {heat.shape[0]}x{heat.shape[1]} "
                                       f"positions ({exact})"))
        png = out_png.with_name(f"{out_png.stem}-{label}{out_png.suffix}") if several else out_png
        writers[png] = functools.partial(save_figure, fig, out_png.suffix.lower().lstrip("."))
    heat = res.heatmaps.numpy() if several else res.heatmap.numpy()
    if out_npy is not None:
        writers[out_npy] = functools.partial(np.save, arr=heat)
    write_files(writers)

    label_name = cats[res.label] if cats and res.label < len(cats) else None
    name = f" '{label_name}'" if label_name else ""
    print(f"{loaded.name} on {args.image} ({prep.description}): class {res.label}{name}, "
          f"{'P' if args.output == 'prob' else 'logit'} = {res.base_prob:.4f}")
    if several:
        print("classes " + ", ".join(f"{k} ({'P' if args.output == 'prob' else 'logit'} {b:.4f})"
                                     for k, b in zip(res.labels, res.base_probs))
              + (" (--npy: one map per class, in this order)" if out_npy is not None else ""))
    run_ = res.stats.get("positions_run", ex.positions)
    ran = f"{run_} of {ex.positions} positions run" if run_ != ex.positions else f"{ex.positions} positions"
    what = "P" if args.output == "prob" else "logit"
    print(f"heat map {heat.shape[-2]}x{heat.shape[-1]} ({ran}, batch {min(ex.batch_size, run_)}) "
          f"in {seconds:.2f} s on {device}; lowest {what} {heat.min():.4f}")
    note = opt.peak_note(res)
    if note:
        print(f"approximate: {note}")
    for path in writers:
        print(f"wrote {path}")
    return 0
