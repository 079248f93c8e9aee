"""Line lists, line windows, censoring masks and per-line diagnostics.

Readers for the GALAH DR3 element mask file (``mode_DR3`` layout) and the
Turbospectrum, MOOG and VALD (short format) line-list formats; windows whose
width follows the resolving power; per-element pixel masks used to censor a
Cannon's label dependence; per-line metrics between a regenerated and an
observed spectrum (:func:`line_metrics`, :func:`aggregate_line_metrics`) and the
attribution of each line's model response to the labels
(:func:`line_label_attribution`), which together flag two model defects: a line
the model misses and a line whose depth the model ties to the wrong element.
Everything here works on arrays and astropy Tables, never on model objects.

Modules, each owning one concern (every public name is re-exported here):

- :mod:`~cannon_bridge.lines.readers`: the line-list formats and :data:`BUILTIN_GALAH_LINES`;
- :mod:`~cannon_bridge.lines.windows`: windows on a grid, censoring masks, :func:`line_strength`,
  :func:`element_of_label` and :func:`line_table`;
- :mod:`~cannon_bridge.lines.metrics`: per-line metrics of regenerated vs observed spectra, their
  aggregation and the defect flags (:class:`LineFlag`);
- :mod:`~cannon_bridge.lines.attribution`: which label drives each line's model flux.
"""
from __future__ import annotations

from .attribution import coefficient_jacobian, line_label_attribution
from .metrics import LineFlag, aggregate_line_metrics, line_metrics
from .readers import (BUILTIN_GALAH_LINES, read_galah_mode_mask, read_moog_linelist, read_turbospectrum_linelist,
                      read_vald_linelist)
from .windows import (SOLAR_ABUNDANCES, element_masks, element_of_label, line_strength, line_table, line_windows,
                      window_mask)

# the flag thresholds, module attributes of ``cannon_bridge.lines`` as before the split (not in __all__)
from .attribution import DOMINANCE_RATIO, MIN_RESPONSE, SIGN_TOLERANCE  # noqa: F401
from .metrics import DEPTH_N_SIGMA, MIN_LINE_DEPTH, MISSING_DEPTH_FRACTION, POOR_FIT_CHI2  # noqa: F401

__all__ = [
    "SOLAR_ABUNDANCES", "BUILTIN_GALAH_LINES", "read_galah_mode_mask", "read_turbospectrum_linelist",
    "read_moog_linelist", "read_vald_linelist", "element_of_label", "window_mask", "line_windows", "element_masks",
    "line_strength", "line_table", "LineFlag", "line_metrics", "aggregate_line_metrics", "coefficient_jacobian",
    "line_label_attribution",
]
