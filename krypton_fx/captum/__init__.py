"""A drop-in for ``captum.attr.Occlusion`` backed by incremental inference.

``from krypton_fx.captum import Occlusion`` instead of ``from captum.attr import
Occlusion``: the same arguments, results and errors (see
:mod:`krypton_fx.captum.occlusion`). Captum itself is not imported.

- :mod:`.forms`: Captum's argument forms, targets, forward calls, errors, progress bar;
- :mod:`.plain`: Captum's algorithm, for what the incremental path cannot take;
- :mod:`.occlusion`: the :class:`Occlusion` class and its incremental path.
"""

from .forms import (
                    OcclusionArgumentError,
                    OcclusionArgumentIndexError,
                    OcclusionArgumentRuntimeError,
                    OcclusionArgumentTypeError,
)
from .occlusion import Occlusion

__all__ = ["Occlusion", "OcclusionArgumentError", "OcclusionArgumentIndexError",
           "OcclusionArgumentRuntimeError", "OcclusionArgumentTypeError"]
