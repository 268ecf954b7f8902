"""Captum's own FeatureAblation tests, with Captum's class swapped for krypton_fx's drop-in.

Captum's test files are not installed with Captum and their code is not kept in this
repository: the file is read from a Captum source checkout (``$KRYPTON_CAPTUM_SRC``) or from
the cache, ``($KRYPTON_CACHE or ~/.cache/krypton_fx)/captum-src/<commit>/``, pinned by its
SHA-256 (the commit closest to Captum 0.9.0 that the file was taken from). To fill the cache::

    git -C captum show d6942ed237f4a4b67ebdf642f4f9ff67da1253b3:tests/attr/test_feature_ablation.py \\
        > ~/.cache/krypton_fx/captum-src/d6942ed237f4a4b67ebdf642f4f9ff67da1253b3/tests/attr/test_feature_ablation.py

The helpers it imports (``captum.testing``) are installed with Captum. The module is loaded
under its own name, its global ``FeatureAblation`` rebound to ours, and its ``Test`` case
collected here: all 48 tests, NoiseTunnel over the drop-in and futures included, run on
krypton_fx's class.
"""

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("captum.testing.helpers")

import krypton_fx.captum  # noqa: E402

COMMIT = "d6942ed237f4a4b67ebdf642f4f9ff67da1253b3"
SUITES = {  # path in Captum's repository -> SHA-256 of the file at COMMIT
    "tests/attr/test_feature_ablation.py": "a8ea140e9fad3a4670449d30739455bb67da912b66267cce33b770c79c14f864",
}


def captum_test_file(path: str) -> Path:
    """Captum's test file at COMMIT, from a checkout or the cache; the module is skipped with
    the command that fills the cache when there is neither."""
    cache = Path(os.environ.get("KRYPTON_CACHE") or Path.home() / ".cache" / "krypton_fx")
    candidates = [cache / "captum-src" / COMMIT / path]
    if os.environ.get("KRYPTON_CAPTUM_SRC"):
        candidates.insert(0, Path(os.environ["KRYPTON_CAPTUM_SRC"]) / path)
    for candidate in candidates:
        if candidate.is_file():
            digest = hashlib.sha256(candidate.read_bytes()).hexdigest()
            assert digest == SUITES[path], (f"{candidate} is not Captum's {path} at {COMMIT[:8]} "
                                            f"(SHA-256 {digest}); see this module's docstring")
            return candidate
    pytest.skip(f"Captum's {path} not found in {[str(c) for c in candidates]}: git -C <captum checkout> show "
                f"{COMMIT}:{path} > {candidates[-1]}", allow_module_level=True)


def load_with_drop_ins(path: str):
    """Captum's test module with its drop-in classes rebound to krypton_fx's."""
    spec = importlib.util.spec_from_file_location("captum_upstream_" + Path(path).stem, captum_test_file(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.FeatureAblation = krypton_fx.captum.FeatureAblation  # the tests look it up at call time
    return module


feature_ablation_suite = load_with_drop_ins("tests/attr/test_feature_ablation.py")
CaptumFeatureAblationTests = feature_ablation_suite.Test


def test_the_suite_runs_our_class_on_all_48_tests():
    names = [n for n in dir(CaptumFeatureAblationTests) if n.startswith("test_")]
    assert len(names) == 48
    assert feature_ablation_suite.FeatureAblation is krypton_fx.captum.FeatureAblation
