"""GPU check of the many-images layer: ``explain --out-dir`` with ``--devices all`` and a mixed
``--devices cuda:0,cpu`` pool against one ``Explainer`` call per image on the GPU, and
``explain_many`` against the per-image loop. Prints one line per check; exit 1 if one fails.

    python bench/scale_gpu_check.py            # needs CUDA; about a minute
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import krypton_fx
from krypton_fx import lesions

MODEL = "import torch\nfrom krypton_fx import lesions\n\n\ndef build():\n    torch.manual_seed(0)\n" \
        "    return lesions.build_model('tiny').eval()\n"
ARGS = ["--model", "tinynet:build", "--size", "64", "--mean", "0", "--std", "1", "--color", "0",
        "--patch", "12", "--stride", "4"]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA: nothing to check")
        return 0
    failed = 0
    work = Path(tempfile.mkdtemp())
    (work / "tinynet.py").write_text(MODEL)
    images, _, _ = lesions.make_dataset(12, 64, seed=5)
    (work / "in").mkdir()
    for i, x in enumerate(images):
        pixels = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(work / "in" / f"img{i:02d}.png")
    torch.manual_seed(0)
    model = lesions.build_model("tiny").eval()
    ex = krypton_fx.compile(model, patch=12, stride=4, color=0.0, image_size=(64, 64), device="cuda")
    xs = [torch.from_numpy(np.array(Image.open(work / "in" / f"img{i:02d}.png"))).permute(2, 0, 1).float() / 255
          for i in range(12)]
    expected = [ex(x).heatmap.numpy() for x in xs]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(work), *sys.path]))
    for devices in ("all", "cuda:0,cpu"):
        out = work / f"out-{devices.replace(':', '').replace(',', '-')}"
        proc = subprocess.run([sys.executable, "-m", "krypton_fx", "explain", str(work / "in"), *ARGS,
                               "--devices", devices, "--out-dir", str(out)],
                              capture_output=True, text=True, timeout=240, env=env)
        worst = max((float(np.abs(np.load(out / f"img{i:02d}.npy") - expected[i]).max()) for i in range(12)),
                    default=float("nan")) if proc.returncode == 0 else float("nan")
        # CPU workers compute some maps in the mixed pool: float32 rounding differs from the GPU.
        ok = proc.returncode == 0 and worst < (1e-5 if devices == "all" else 1e-4)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} explain --devices {devices}: exit {proc.returncode}, max |diff| vs "
              f"Explainer on cuda {worst:.1e}; {proc.stdout.strip().splitlines()[0] if proc.stdout else ''}"
              f"{'' if ok else ' ' + proc.stderr[-2000:]}", flush=True)
    many = [r.heatmap.numpy() for r in krypton_fx.explain_many(ex, torch.stack(xs).cuda())]
    ok = all(np.array_equal(a, b) for a, b in zip(many, expected))
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} explain_many on cuda equals the per-image loop bit for bit", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
