"""Approximate occlusion: adaptive drill-down (eqs. 46-48), heat-map metrics, and tuning (section 4.4).

Projective-field thresholding itself (eqs. 39-45) lives in
:func:`krypton_fx.geometry.local_box` and is switched on by
``compile(tau=...)``; the peak rule, which recomputes exactly the cells that
decide an approximate map's reading, in :mod:`krypton_fx.peak`. This package
adds what is built on top of them:

* :mod:`.cover`: drill-down's covering stage one, patches that contain every
  fine patch (a drop cannot fall between them);
* :mod:`.drilldown`: :class:`DrillDown` / :func:`run_drill_down`, a coarse
  stage-one map, the compiled stride on the fraction ``r`` of cells with
  the largest drop, then the peak rule;
* :mod:`.metrics`: :func:`heatmap_ssim`, :func:`drop_kept` and :func:`peak_kept`;
* :mod:`.tuning`, :mod:`.tune_drill`: :func:`tune`, tau and a covering
  drill-down that keep the sample images' peaks (SSIM reported).
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
from .metrics import MIN_PROB_DROP, drop_kept, heatmap_ssim, peak_kept
from .tune_drill import DrillDownTrial, choose_drill_down
from .tuning import TuneResult, guard_tau, select_tau, tune

__all__ = ["DrillDown", "drill_down_speedup", "stage1_stride", "max_drill_down_speedup",
           "stage1_grid", "upsample_matrix", "run_drill_down", "heatmap_ssim", "drop_kept", "peak_kept",
           "MIN_PROB_DROP", "select_tau", "guard_tau", "TuneResult", "tune", "DrillDownTrial",
           "choose_drill_down"]
