"""Without Triton (it is Linux-only: macOS and Windows have none) the package
imports, compiles and explains on the torch ops.

Each check runs in a fresh interpreter where ``import triton`` fails
(``sys.modules["triton"] = None``), without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _run_without_triton(code: str) -> subprocess.CompletedProcess:
    script = "import sys\nsys.modules['triton'] = None  # import triton: ImportError\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, TESTS, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", script + textwrap.dedent(code)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_package_compiles_and_explains_without_triton():
    result = _run_without_triton("""
        import importlib, logging
        import torch
        import krypton_fx
        from krypton_fx import ops
        from krypton_fx.triton_kernels import codegen, config, launch_config, reference
        from strategies import dag_model

        torch.set_num_threads(1)
        for name in ("gather", "projection", "occlusion"):
            try:
                importlib.import_module(f"krypton_fx.triton_kernels.{name}")
                raise AssertionError(f"{name} imported without triton")
            except ImportError:
                pass
        assert not ops.triton_available() and sys.modules["triton"] is None

        model = dag_model()
        image = torch.randn(3, 21, 19, generator=torch.Generator().manual_seed(0))
        settings = dict(patch=(5, 4), stride=(4, 3), color=[0.1, -0.2, 0.3])
        heatmaps = [krypton_fx.compile(model, image_size=(21, 19), backend=backend,
                                       batch_size=7, **settings)(image).heatmap
                    for backend in ("auto", "torch")]
        naive = krypton_fx.naive_occlusion(model, image, **settings).heatmap
        assert torch.equal(heatmaps[0], heatmaps[1])
        torch.testing.assert_close(heatmaps[0], naive, atol=1e-5, rtol=0)

        try:
            ops.gather_window(torch.zeros(1, 1, 4, 4), None, torch.zeros(1, 4, dtype=torch.int64),
                              (2, 2), backend="triton")
            raise AssertionError("backend='triton' ran without triton")
        except ImportError as e:
            assert "pip install triton" in str(e) and "backend='torch'" in str(e), e
        print("ok")
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok"), result.stdout
