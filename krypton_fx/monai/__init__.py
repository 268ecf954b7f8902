"""MONAI-compatible occlusion sensitivity (``pip install krypton_fx[monai]``).

``krypton_fx.monai.OcclusionSensitivity`` takes the arguments of MONAI 1.6's
``monai.visualize.OcclusionSensitivity`` and returns its answer. This package
imports MONAI; the rest of krypton_fx does not.

Example:
    >>> import torch
    >>> from monai.networks.nets import DenseNet
    >>> from krypton_fx.monai import OcclusionSensitivity
    >>> model = DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=2,
    ...                  growth_rate=2, block_config=(2,))
    >>> occ_map, most_probable = OcclusionSensitivity(model, mask_size=4, verbose=False)(
    ...     torch.rand(1, 1, 8, 8, 8))
    >>> tuple(occ_map.shape), tuple(most_probable.shape)
    ((1, 2, 8, 8, 8), (1, 1, 8, 8, 8))
"""

from .occlusion import OcclusionSensitivity
from .rules import OcclusionRule, activate_outputs, occlusion_rule
from .windows import WindowGrid, blend_windows, window_grid

__all__ = ["OcclusionSensitivity", "OcclusionRule", "occlusion_rule", "activate_outputs", "WindowGrid",
           "window_grid", "blend_windows"]
