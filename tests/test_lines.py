import numpy as np
import pytest

from cannon_bridge.errors import InvalidInputError
from cannon_bridge.lines import (element_masks, element_of_label, line_windows, read_galah_mode_mask,
                                 read_turbospectrum_linelist, window_mask)

TS_TEXT = """'  56.000            '    2         2
'Ba II   NLTE'
  5853.668  0.604 -0.910  1.000    6.0  1.0E+08 'x' 'x'   0.0    1.0 'Ba II'
  6496.897  0.604 -0.377  1.000    4.0  1.0E+08 'x' 'x'   0.0    1.0 'Ba II'
'  26.000            '    1         1
'Fe I    LTE'
  5855.076  4.608 -1.478  1.000    6.0  1.0E+08 'x' 'x'   0.0    1.0 'Fe I'
'  606.000           '    1         1
'C2'
  5856.000  0.100 -1.000  1.000    6.0  1.0E+08 'x' 'x'   0.0    1.0 'C2'
"""

MODE_TEXT = """;elem\tlambda  maskst  maskend segst\tsegend  res\tcomment
Sp 0 0 0 0 0 0
Ba5854\t5853.6680\t5853.370\t5854.000\t5851.668\t5855.668\t35000.\t;ref
Fe5855\t5855.0758\t5854.802\t5855.323\t5854.000\t5856.300\t35000.  ;BK
"""


def test_turbospectrum_reader(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text(TS_TEXT)
    table = read_turbospectrum_linelist(path)
    assert list(table["species"]) == ["Ba II", "Ba II", "Fe I"]  # the molecule is skipped
    assert table["ion"][0] == 2 and np.isclose(table["log_gf"][1], -0.377)
    assert len(read_turbospectrum_linelist(path, elements=["Fe"])) == 1


def test_mode_mask_reader(tmp_path):
    path = tmp_path / "mode"
    path.write_text(MODE_TEXT)
    table = read_galah_mode_mask(path)
    assert list(table["element"]) == ["Ba", "Fe"]
    assert np.isclose(table["mask_start"][0], 5853.370)
    (tmp_path / "empty").write_text("nothing here\n")
    with pytest.raises(InvalidInputError, match="no line-mask rows"):
        read_galah_mode_mask(tmp_path / "empty")


def test_windows_and_masks(tmp_path):
    grid = np.linspace(5850, 5860, 1001)
    windows = line_windows([5853.668], 28000.0, 1.0)
    assert np.allclose(windows[0, 1] - windows[0, 0], 2 * 5853.668 / 28000)
    mask = window_mask(grid, windows)
    assert np.array_equal(mask, (grid >= windows[0, 0]) & (grid <= windows[0, 1]))
    (tmp_path / "lines.txt").write_text(TS_TEXT)
    table = read_turbospectrum_linelist(tmp_path / "lines.txt")
    masks = element_masks(grid, ["Ba", "Fe"], 28000.0, linelist=table, min_strength=-10)
    assert masks["Ba"].sum() == mask.sum() and masks["Fe"].any() and not (masks["Fe"] & masks["Ba"]).any()
    assert element_of_label("ba_fe") == "Ba"


def test_mode_dr3_masks_on_shared(shared_dir):
    table = read_galah_mode_mask(shared_dir / "data/linelists_masks/galah/mode_DR3")
    assert {"Ba", "Eu", "Y", "Fe"} <= set(table["element"])
    assert np.sum(table["element"] == "Fe") >= 50
