"""Approximate occlusion: adaptive drill-down (eqs. 46-48), heat-map metrics, and tau tuning (section 4.4).

Projective-field thresholding itself (eqs. 39-45) lives in
:func:`krypton_fx.geometry.local_box` and is switched on by
``compile(tau=...)``; this package adds what is built on top of it:

* :mod:`.drilldown`: :class:`DrillDown` / :func:`run_drill_down`, a coarse
  stage-one map, then the compiled stride on the fraction ``r`` of cells with
  the largest drop;
* :mod:`.metrics`: :func:`heatmap_ssim` and :func:`drop_kept`;
* :mod:`.tuning`: :func:`tune`, the smallest tau whose maps keep a target SSIM
  against the exact ones, from a degree-2 fit of SSIM against tau.
"""

from .drilldown import (
                        DrillDown,
                        drill_down_speedup,
                        max_drill_down_speedup,
                        run_drill_down,
                        stage1_grid,
                        stage1_stride,
                        upsample_matrix,
)
from .metrics import MIN_PROB_DROP, drop_kept, heatmap_ssim
from .tuning import TuneResult, guard_tau, select_tau, tune

__all__ = ["DrillDown", "drill_down_speedup", "stage1_stride", "max_drill_down_speedup",
           "stage1_grid", "upsample_matrix", "run_drill_down", "heatmap_ssim", "drop_kept",
           "MIN_PROB_DROP", "select_tau", "guard_tau", "TuneResult", "tune"]
