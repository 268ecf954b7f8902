"""Drop-ins for ``captum.attr.Occlusion`` and ``captum.attr.FeatureAblation``.

``from krypton_fx.captum import Occlusion, FeatureAblation`` instead of ``from
captum.attr import ...``: the same arguments, results and errors (see
:mod:`krypton_fx.captum.occlusion` and :mod:`krypton_fx.captum.feature_ablation`).
Captum itself is not imported.

- :mod:`.forms`: Captum's argument forms, targets, feature masks, forward calls, errors,
  progress bar;
- :mod:`.plain`: Captum's algorithms, for what the incremental paths cannot take;
- :mod:`.occlusion`: the :class:`Occlusion` class and its incremental path;
- :mod:`.feature_ablation`: the :class:`FeatureAblation` class and its seam to the engine's
  segment ablation.
"""

from .feature_ablation import FeatureAblation
from .forms import (
                    CaptumArgumentError,
                    CaptumArgumentIndexError,
                    CaptumArgumentRuntimeError,
                    CaptumArgumentTypeError,
                    OcclusionArgumentError,
                    OcclusionArgumentIndexError,
                    OcclusionArgumentRuntimeError,
                    OcclusionArgumentTypeError,
)
from .occlusion import Occlusion

__all__ = ["Occlusion", "FeatureAblation", "CaptumArgumentError", "CaptumArgumentIndexError",
           "CaptumArgumentRuntimeError", "CaptumArgumentTypeError", "OcclusionArgumentError",
           "OcclusionArgumentIndexError", "OcclusionArgumentRuntimeError", "OcclusionArgumentTypeError"]
