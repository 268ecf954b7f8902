"""``krypton-fx explain FILES_DIRS_GLOBS... --out-dir OUT``, run as a user runs it.

The maps equal one ``Explainer`` call per image; bad files are rows, not
crashes; a rerun touches nothing complete; a killed run leaves no partial
file and the rerun finishes the rest; ``--devices cpu,cpu`` (two workers)
gives the same maps.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import krypton_fx
from krypton_fx import lesions

SIZE = 32
# The model input is the file's pixels in [0, 1] (mean 0, std 1) and the patch is black:
# the expected maps come from plain krypton_fx.compile calls.
ARGS = ["--model", "tinynet:build", "--size", str(SIZE), "--mean", "0", "--std", "1", "--color", "0",
        "--patch", "8", "--stride", "4", "--device", "cpu"]
MODEL_SOURCE = '''import torch
from krypton_fx import lesions


def build():
    torch.manual_seed(0)
    return lesions.build_model("tiny").eval()
'''


def tiny_model():
    torch.manual_seed(0)
    return lesions.build_model("tiny").eval()


def run_cli(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "krypton_fx", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def write_image(path: Path, seed: int, size: int = SIZE) -> None:
    images, _, _ = lesions.make_dataset(1, size, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def expected_map(path: Path, patch=8, stride=4) -> np.ndarray:
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    ex = krypton_fx.compile(tiny_model(), patch=patch, stride=stride, color=0.0, image_size=(SIZE, SIZE))
    return ex(x).heatmap.numpy()


def summary(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def snapshot(out: Path) -> dict:
    """Every file under ``out`` (hidden ones too) -> (inode, mtime_ns, size)."""
    return {p.relative_to(out): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in out.rglob("*") if p.is_file()}


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "tinynet.py").write_text(MODEL_SOURCE)
    return tmp_path


def test_folder_maps_equal_the_api_and_equal_stems_do_not_collide(workdir):
    write_image(workdir / "in" / "a.png", 1)
    write_image(workdir / "in" / "b.png", 2)
    write_image(workdir / "in" / "sub" / "a.png", 3)  # the same stem as in/a.png
    proc = run_cli("explain", "in", *ARGS, "--out-dir", "out", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "3 images: 3 explained" in proc.stdout
    out = workdir / "out"
    rows = summary(out)
    assert [r["path"] for r in rows] == ["in/a.png", "in/b.png", "in/sub/a.png"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    stems = [r["output"] for r in rows]
    assert stems[:2] == ["a", "b"] and re.fullmatch(r"a-[0-9a-f]{8}", stems[2])
    for row in rows:
        heat = np.load(out / f"{row['output']}.npy")
        np.testing.assert_array_equal(heat, expected_map(workdir / row["path"]))
        assert float(row["drop"]) == pytest.approx(float(row["probability"]) - heat.min(), abs=1e-5)
        cell = np.unravel_index(np.argmin(heat), heat.shape)
        assert (int(row["drop_y"]), int(row["drop_x"])) == (cell[0] * 4, cell[1] * 4)
        with Image.open(out / f"{row['output']}.png") as picture:
            picture.load()

    # Two workers over a shared queue (two CPU "devices") and a glob: the same maps, the same names.
    proc = run_cli("explain", "in/*.png", "in/sub", *ARGS[:-2], "--devices", "cpu,cpu", "--out-dir", "out2",
                   cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    rows2 = summary(workdir / "out2")
    assert [(r["path"], r["output"]) for r in rows2] == [(r["path"], r["output"]) for r in rows]
    for row in rows:
        np.testing.assert_array_equal(np.load(workdir / "out2" / f"{row['output']}.npy"),
                                      np.load(out / f"{row['output']}.npy"))


def test_pack_lets_the_images_share_batches(workdir, monkeypatch, capsys):
    from krypton_fx import packing
    from krypton_fx.cli import main

    for seed in (1, 2, 3):
        write_image(workdir / "in" / f"{seed}.png", seed)
    packs = []
    real = packing.run_packed
    monkeypatch.setattr(packing, "run_packed", lambda ex, images, *a, **k: packs.append(len(images))
                        or real(ex, images, *a, **k))
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    assert main(["explain", "in", *ARGS, "--out-dir", "out", "--pack"]) == 0
    assert packs == [3]  # the three images' 49 positions in one run
    for seed in (1, 2, 3):
        np.testing.assert_allclose(np.load(workdir / "out" / f"{seed}.npy"),
                                   expected_map(workdir / "in" / f"{seed}.png"), atol=1e-6, rtol=0)


def test_bad_files_are_rows_and_a_rerun_touches_nothing_complete(workdir):
    folder = workdir / "in"
    write_image(folder / "good1.png", 1)
    write_image(folder / "good2.png", 2)
    (folder / "corrupt.png").write_bytes((folder / "good1.png").read_bytes()[:150])
    (folder / "notes.txt").write_text("not an image\n")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        write_image(folder / "locked.png", 3)
        os.chmod(folder / "locked.png", 0)
    else:  # root reads a chmod 000 file: a link to nowhere cannot be read either
        (folder / "locked.png").symlink_to(workdir / "gone.png")
    proc = run_cli("explain", folder, *ARGS, "--out-dir", "out", cwd=workdir)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("krypton-fx: 3 of 5 images failed")
    assert "Traceback" not in proc.stderr
    out = workdir / "out"
    rows = {Path(r["path"]).name: r for r in summary(out)}
    assert set(rows) == {"corrupt.png", "good1.png", "good2.png", "locked.png", "notes.txt"}
    assert rows["good1.png"]["status"] == rows["good2.png"]["status"] == "ok"
    assert "corrupt or truncated" in rows["corrupt.png"]["error"]
    assert "not an image file" in rows["notes.txt"]["error"]
    assert re.search(r"permission denied|does not exist", rows["locked.png"]["error"])
    for name in ("corrupt", "locked", "notes"):
        assert rows[f"{name}.{'txt' if name == 'notes' else 'png'}"]["status"] == "error"
        assert not (out / f"{name}.png").exists() and not (out / f"{name}.npy").exists()
    for name in ("good1", "good2"):
        np.testing.assert_array_equal(np.load(out / f"{name}.npy"), expected_map(folder / f"{name}.png"))

    before = snapshot(out)
    proc = run_cli("explain", folder, *ARGS, "--out-dir", "out", cwd=workdir)
    assert proc.returncode == 1, proc.stderr
    after = snapshot(out)
    changed = {p for p in before if after.get(p) != before[p]}
    assert changed <= {Path("summary.csv")}, changed
    rows = {Path(r["path"]).name: r for r in summary(out)}
    assert rows["good1.png"]["status"] == "skipped" and rows["good1.png"]["probability"]
    assert "0 explained, 2 complete from an earlier run, 3 failed" in proc.stdout

    # --overwrite redoes complete images (same maps); other settings without it are refused
    proc = run_cli("explain", folder / "good1.png", *ARGS, "--out-dir", "out", "--overwrite", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(out)[Path("good1.npy")] != after[Path("good1.npy")]
    proc = run_cli("explain", folder / "good1.png", *ARGS, "--stride", "8", "--out-dir", "out", cwd=workdir)
    assert proc.returncode == 2 and "made with other settings" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_killed_run_leaves_no_partial_file_and_the_rerun_finishes(workdir):
    n = 8
    for i in range(n):
        write_image(workdir / "in" / f"img{i}.png", 10 + i)
    slow = list(ARGS)
    slow[slow.index("--stride") + 1] = "2"
    out = workdir / "out"
    proc = subprocess.Popen([sys.executable, "-m", "krypton_fx", "explain", "in", *slow, "--out-dir", "out"],
                            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    records = out / ".krypton-fx"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_dir() and len(list(records.glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    finished = {p.stem for p in records.glob("*.json")}
    assert 2 <= len(finished) < n
    for f in out.iterdir():
        if f.name.startswith("."):
            continue  # the records folder, and temporaries of the file being written when killed
        if f.suffix == ".npy":
            assert np.load(f).shape == (13, 13)
        elif f.suffix == ".png":
            with Image.open(f) as picture:
                picture.load()
        else:
            pytest.fail(f"unexpected file {f.name}")
    before = snapshot(out)

    proc = run_cli("explain", "in", *slow, "--out-dir", "out", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    rows = summary(out)
    assert len(rows) == n and sorted(r["output"] for r in rows) == [f"img{i}" for i in range(n)]
    assert sum(r["status"] == "skipped" for r in rows) == len(finished)
    after = snapshot(out)
    for stem in finished:
        for name in (f"{stem}.png", f"{stem}.npy", f".krypton-fx/{stem}.json"):
            assert after[Path(name)] == before[Path(name)]
    assert not [f for f in out.rglob("*.tmp")], "temporaries left behind"
    for i in range(n):
        np.testing.assert_array_equal(np.load(out / f"img{i}.npy"),
                                      expected_map(workdir / "in" / f"img{i}.png", stride=2))


# --- combinations that make no sense: exit 2, one line, nothing written ---------------------------

BAD = {
    "--out with --out-dir": (["in/a.png", *ARGS, "--out-dir", "o", "--out", "x.png"], "drop --out"),
    "--device and --devices": (["in/a.png", *ARGS, "--out-dir", "o", "--devices", "cpu"], "not both"),
    "--devices without --out-dir": (["in/a.png", *ARGS[:-2], "--devices", "cpu"], "add --out-dir"),
    "--workers without --ray": (["in/a.png", *ARGS, "--out-dir", "o", "--workers", "2"], "--ray"),
    "two images without --out-dir": (["in/a.png", "in/b.png", *ARGS], "use --out-dir"),
    "output would overwrite an input": (["in/a.png", *ARGS, "--out-dir", "in"], "never overwrites an input"),
    "a GPU that is not there": (["in/a.png", *ARGS[:-2], "--out-dir", "o", "--devices", "cuda:7"], "cuda"),
    "nothing to explain": (["empty", *ARGS, "--out-dir", "o"], "no input files"),
    "--pack without --out-dir": (["in/a.png", *ARGS, "--pack"], "add --out-dir"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_many")

    def run(case):
        cwd = root / re.sub(r"\W+", "_", case)
        (cwd / "empty").mkdir(parents=True)
        (cwd / "tinynet.py").write_text(MODEL_SOURCE)
        write_image(cwd / "in" / "a.png", 1)
        write_image(cwd / "in" / "b.png", 2)
        before = {p for p in cwd.rglob("*") if "__pycache__" not in p.parts}
        proc = run_cli("explain", *BAD[case][0], cwd=cwd)
        after = {p for p in cwd.rglob("*") if "__pycache__" not in p.parts}
        return case, (proc, after - before)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, BAD))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_combinations_exit_2_with_one_line(case, bad_runs):
    if case == "a GPU that is not there" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    proc, new = bad_runs[case]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("krypton-fx: error: "), proc.stderr
    assert BAD[case][1] in lines[0]
    assert not new, sorted(map(str, new))
