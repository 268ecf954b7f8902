"""The ``krypton-fx`` command line, run as a user runs it: ``python -m krypton_fx ...``.

Each subprocess pays torch's import (seconds on a busy CI machine), so the
bad-input cases are launched together, a few at a time, by one module-scoped
fixture; each case is still its own test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import krypton_fx

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPLAIN = ["--model", "resnet18", "--weights", "none", "--size", "64", "--patch", "16", "--stride", "16",
           "--device", "cpu"]


def run_cli(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "krypton_fx", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def write_test_image(path: Path, size: int = 64, mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    pixels[20:40, 24:44] = (230, 40, 40)  # something for the model to look at
    Image.fromarray(pixels).convert(mode).save(path)


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def model_input(path: Path) -> torch.Tensor:
    """The CLI's preprocessing for a 64x64 RGB file at --size 64: to [0, 1], ImageNet-normalise."""
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


# --- what works ----------------------------------------------------------------------


def test_explain_writes_picture_and_heatmap_equal_to_the_api(tmp_path):
    image = tmp_path / "scan.png"
    write_test_image(image)
    proc = run_cli("explain", image, *EXPLAIN, "--color", "black", "--out", "map.png", "--npy", "map.npy",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "random weights" in proc.stderr  # --weights none warns that the map is meaningless

    with Image.open(tmp_path / "map.png") as picture:
        picture.load()
        width, height = picture.size
    assert 600 <= width <= 3000 and 250 <= height <= 1500 and width > height

    heat = np.load(tmp_path / "map.npy")
    torch.manual_seed(0)  # the CLI's --seed default: the same random initialisation
    model = torchvision.models.get_model("resnet18", weights=None)
    black = [(0.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    ex = krypton_fx.compile(model, patch=16, stride=16, color=black, image_size=(64, 64))
    expected = ex(model_input(image)).heatmap.numpy()
    assert heat.shape == expected.shape == (4, 4)
    np.testing.assert_allclose(heat, expected, rtol=0, atol=1e-5)


def test_explain_drill_down_equals_the_api(tmp_path):
    image = tmp_path / "scan.png"
    write_test_image(image)
    args = ["--model", "resnet18", "--weights", "none", "--size", "64", "--patch", "16", "--stride", "4",
            "--device", "cpu", "--color", "black", "--drill-down", "0.25"]
    proc = run_cli("explain", image, *args, "--out", "map.png", "--npy", "map.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"heat map 13x13 \((\d+) of 169 positions run", proc.stdout), proc.stdout
    # how sure the map is: the covering stage one's promise, on one line
    assert re.search(r"approximate: \d+ of 169 cells computed exactly; the strongest drop is exact, and the "
                     r"exact map's whenever a larger occluder drops at least 50% as much", proc.stdout), proc.stdout
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None)
    black = [(0.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    ex = krypton_fx.compile(model, patch=16, stride=4, color=black, image_size=(64, 64))
    # --stage1-stride defaults to 4 x --stride: the covering stage one, the peak rule's default margin
    expected = ex(model_input(image), drill_down=krypton_fx.DrillDown(r=0.25, stage1_stride=16))
    run = int(re.search(r"\((\d+) of 169", proc.stdout).group(1))
    assert run == expected.stats["positions_run"] < 169
    np.testing.assert_allclose(np.load(tmp_path / "map.npy"), expected.heatmap.numpy(), rtol=0, atol=1e-5)


def test_speedup_prints_the_theoretical_speedup_and_the_report(tmp_path):
    proc = run_cli("speedup", "--model", "resnet18", "--size", "64", "--patch", "16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = re.search(r"theoretical speedup: (\d+\.\d+)", proc.stdout)
    assert printed, proc.stdout
    expected = krypton_fx.theoretical_speedup(torchvision.models.resnet18(), (64, 64), 16)
    assert float(printed.group(1)) == pytest.approx(expected, abs=5e-5)
    assert re.search(r"^node\s+op\s+kind\s+state", proc.stdout, re.M)
    assert "conv multiply-adds per position" in proc.stdout


def test_bench_writes_table_json_and_plot(tmp_path):
    proc = run_cli("bench", "--models", "resnet18,squeezenet1_0", "--size", "64", "--positions", "8",
                   "--out", "results", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "results"
    report = json.loads((out / "bench.json").read_text())
    assert [r["model"] for r in report["results"]] == ["resnet18", "squeezenet1_0"]
    for row in report["results"]:
        assert row["status"] == "ok", row
        assert row["positions"] == 8 and row["theoretical"] > 1 and row["speedup"] > 0
        assert row["max_abs_diff"] < 1e-4  # the exact mode is exact
        assert row["ratio"] == pytest.approx(row["speedup"] / row["theoretical"])
    table = (out / "bench.txt").read_text()
    for name in ("resnet18", "squeezenet1_0"):
        assert re.search(rf"^{name}\s+\d+\.\d+x\s+\d+\.\d+x", table, re.M), table
        assert name in proc.stdout
    with Image.open(out / "bench.png") as plot:
        plot.load()
        assert min(plot.size) > 100


def test_labels_write_one_picture_per_class_and_every_map_in_the_npy(tmp_path):
    image = tmp_path / "scan.png"
    write_test_image(image)
    proc = run_cli("explain", image, *EXPLAIN, "--color", "black", "--labels", "7,3", "--npy", "maps.npy",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "heat-7.png").is_file() and (tmp_path / "heat-3.png").is_file()
    assert not (tmp_path / "heat.png").exists()
    maps = np.load(tmp_path / "maps.npy")
    torch.manual_seed(0)
    model = torchvision.models.get_model("resnet18", weights=None)
    black = [(0.0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    ex = krypton_fx.compile(model, patch=16, stride=16, color=black, image_size=(64, 64))
    x = model_input(image)
    assert maps.shape == (2, 4, 4)
    np.testing.assert_allclose(maps[0], ex(x, label=7).heatmap.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(maps[1], ex(x, label=3).heatmap.numpy(), rtol=0, atol=1e-5)


# --- bad input: exit 2, one line on stderr, no traceback, no output file -------------------

BAD_INPUTS = {
    "missing image": ["explain", "nope.png", *EXPLAIN],
    "truncated image": ["explain", "in/truncated.png", *EXPLAIN],
    "unreadable image": ["explain", "in/locked.png", *EXPLAIN],
    "unknown model": ["explain", "in/scan.png", "--model", "resnet19", "--weights", "none"],
    "weights that do not fit": ["explain", "in/scan.png", "--model", "squeezenet1_1",
                                "--weights", "in/two_classes.pt", "--size", "64"],
    "patch larger than the image": ["explain", "in/scan.png", *EXPLAIN, "--patch", "65"],
    "stride 0": ["explain", "in/scan.png", *EXPLAIN, "--stride", "0"],
    "cuda without cuda": ["explain", "in/scan.png", *EXPLAIN, "--device", "cuda"],
    "output directory missing": ["explain", "in/scan.png", *EXPLAIN, "--out", "no/such/dir/map.png"],
    "bench unknown model": ["bench", "--models", "resnet18,not_a_model", "--out", "bench"],
    "drill-down fraction above 1": ["explain", "in/scan.png", *EXPLAIN, "--drill-down", "1.5"],
    "stage-one stride without drill-down": ["explain", "in/scan.png", *EXPLAIN, "--stage1-stride", "32"],
    "stage-one stride finer than stride": ["explain", "in/scan.png", *EXPLAIN, "--drill-down", "0.2",
                                           "--stage1-stride", "8"],
    "margin of an exact map": ["explain", "in/scan.png", *EXPLAIN, "--margin", "0.3"],
    "negative margin": ["explain", "in/scan.png", *EXPLAIN, "--drill-down", "--margin", "-1"],
    "weights with a pickled payload": ["explain", "in/scan.png", "--model", "resnet18", "--weights",
                                       "in/evil.pt", "--size", "64"],
    "weights file that is no checkpoint": ["explain", "in/scan.png", "--model", "resnet18", "--weights",
                                           "in/text.pt", "--size", "64"],
    "output is the input": ["explain", "in/scan.png", *EXPLAIN, "--out", "in/scan.png"],
    "npy is the input": ["explain", "in/scan.png", *EXPLAIN, "--npy", "in/scan.png"],
    "mean not a number": ["explain", "in/scan.png", *EXPLAIN, "--mean", "nan"],
    "colour out of float32 range": ["explain", "in/scan.png", *EXPLAIN, "--color", "1e300"],
    "speedup of a model that cannot run": ["speedup", "--model", "vit_b_16", "--size", "64"],
    "label and labels": ["explain", "in/scan.png", *EXPLAIN, "--label", "1", "--labels", "2,3"],
    "labels out of range": ["explain", "in/scan.png", *EXPLAIN, "--labels", "2,1000"],
    "top-k with drill-down": ["explain", "in/scan.png", *EXPLAIN, "--top-k", "2", "--drill-down", "0.5"],
}

# What some cases' one line must say (beyond the common form).
BAD_INPUT_WORDS = {
    "weights with a pickled payload": "never runs code from a weights file",
    "weights file that is no checkpoint": "not a PyTorch weights file",
    "output is the input": "never overwrites an input",
    "npy is the input": "never overwrites an input",
    "mean not a number": "--mean: must be finite",
    "margin of an exact map": "--margin applies to approximate maps",
    "negative margin": "--margin: must be a number >= 0 or none",
    "colour out of float32 range": "out of range for the model's float32",
    "speedup of a model that cannot run": "cannot run on a (1, 3, 64, 64) input",
    "label and labels": "--label and --labels both choose classes",
    "labels out of range": "--labels 1000 is out of range",
    "top-k with drill-down": "--drill-down explains one class",
}


class _Payload:
    """Unpickling this runs ``touch PATH``: what a malicious weights file does."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _skip_reason(case: str):
    if case == "cuda without cuda" and torch.cuda.is_available():
        return "this machine has CUDA"
    if case == "unreadable image" and (not hasattr(os, "geteuid") or os.geteuid() == 0):
        return "root (or no POSIX permissions) can read a chmod 000 file"
    return None


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Run every bad-input case (a few at a time) in its own fresh working directory."""
    root = tmp_path_factory.mktemp("bad_inputs")
    inputs = root / "shared_inputs"
    inputs.mkdir()
    write_test_image(inputs / "scan.png")
    (inputs / "truncated.png").write_bytes((inputs / "scan.png").read_bytes()[:200])
    write_test_image(inputs / "locked.png")
    os.chmod(inputs / "locked.png", 0)
    torch.save(torchvision.models.get_model("squeezenet1_1", num_classes=2).state_dict(),
               inputs / "two_classes.pt")
    torch.save({"state_dict": _Payload(inputs / "PWNED")}, inputs / "evil.pt")
    (inputs / "text.pt").write_text("not\na checkpoint\n")

    def run(case: str):
        cwd = root / re.sub(r"\W+", "_", case)
        cwd.mkdir()
        (cwd / "in").symlink_to(inputs, target_is_directory=True)
        before = files_under(cwd)
        proc = run_cli(*BAD_INPUTS[case], cwd=cwd)
        return case, proc, files_under(cwd) - before

    cases = [c for c in BAD_INPUTS if _skip_reason(c) is None]
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        runs = _Runs({case: (proc, new) for case, proc, new in pool.map(run, cases)})
    runs.inputs = inputs
    return runs


class _Runs(dict):
    """case -> (process, new files); ``inputs`` is the folder every case reads from."""

    inputs: Path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, bad_input_runs):
    if _skip_reason(case):
        pytest.skip(_skip_reason(case))
    proc, new_files = bad_input_runs[case]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("krypton-fx: error: "), lines
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not new_files, f"left behind: {sorted(map(str, new_files))}"
    assert BAD_INPUT_WORDS.get(case, "") in lines[0]


def test_a_pickled_payload_in_weights_never_runs(bad_input_runs):
    proc, _ = bad_input_runs["weights with a pickled payload"]
    assert proc.returncode == 2
    assert not (bad_input_runs.inputs / "PWNED").exists(), "unpickling the weights file ran its payload"


def test_an_output_symlink_is_written_through(tmp_path):
    image = tmp_path / "scan.png"
    write_test_image(image)
    (tmp_path / "maps").mkdir()
    target = tmp_path / "maps" / "real.png"
    target.write_bytes(b"old")
    (tmp_path / "link.png").symlink_to(target)
    proc = run_cli("explain", image, *EXPLAIN, "--out", "link.png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "link.png").is_symlink()  # the link stays a link ...
    with Image.open(target) as picture:  # ... and its target holds the new picture
        picture.load()


def test_warnings_for_a_stride_past_the_patch_and_a_one_class_model(tmp_path):
    image = tmp_path / "scan.png"
    write_test_image(image)
    proc = run_cli("explain", image, "--model", "resnet18", "--weights", "none", "--num-classes", "1",
                   "--size", "64", "--patch", "8", "--stride", "16", "--batch-size", "100000",
                   "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--stride 16x16 is larger than --patch 8x8" in proc.stderr
    assert "one output: its softmax probability is 1 everywhere" in proc.stderr
    assert "(16 positions, batch 16)" in proc.stdout  # the batch that ran, not the one asked for


@pytest.mark.parametrize("python_on_fd_2", [True, False], ids=["a terminal's stderr", "a captured stderr"])
def test_native_stderr_goes_to_a_file_while_pythons_keeps_the_terminal(tmp_path, capfd, monkeypatch,
                                                                        python_on_fd_2):
    """What Ray's C++ core writes to descriptor 2 lands in Ray's log folder; the command's own
    warnings, progress and log lines (sys.stderr, the krypton_fx log handler) stay on the terminal."""
    import io
    import logging

    from krypton_fx.cli.errors import attach_log_handler, native_stderr_to, warn

    if python_on_fd_2:  # as in a terminal: sys.stderr writes to descriptor 2 itself
        monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True))
    handler = attach_log_handler()
    try:
        with native_stderr_to(tmp_path / "native.err"):
            os.write(2, b"[E core_worker.cc:1] native\n")
            warn("ours")
            logging.getLogger("krypton_fx.test").warning("logged")
        os.write(2, b"after\n")
    finally:
        logging.getLogger("krypton_fx").removeHandler(handler)
    err = capfd.readouterr().err
    assert (tmp_path / "native.err").read_text() == "[E core_worker.cc:1] native\n"
    assert "krypton-fx: warning: ours" in err and "krypton-fx: warning: logged" in err and "after" in err
    assert "native" not in err
