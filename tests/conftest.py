"""Test configuration.

``TRITON_INTERPRET=1`` must be set before any Triton kernel is imported, so
that the kernels run on the CPU in CI. A machine with CUDA can run them for
real with ``KRYPTON_TRITON_NATIVE=1``.
"""

import os

if not os.environ.get("KRYPTON_TRITON_NATIVE"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # the kernels' tests launch the kernels from the first call (tests opt into tiers)
    os.environ.setdefault("KRYPTON_FX_TIERED", "0")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=25,
                          print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One thread per xdist worker (the workers share the cores), else up to two.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))
