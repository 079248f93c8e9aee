"""cannon_bridge.stats.robust_std: the two robust spreads (percentile half-range, scaled MAD) of the package."""
import numpy as np
import pytest

from cannon_bridge.errors import InvalidInputError
from cannon_bridge.stats import MAD_TO_SIGMA, SIGMA_PERCENTILES, robust_std
from cannon_bridge.validation import robust_scatter


@pytest.mark.parametrize("n", [5, 6, 17, 400])
def test_percentile_spread_is_half_the_one_sigma_percentile_range(rng, n):
    values = rng.standard_cauchy(n)
    low, high = np.percentile(values, [15.865, 84.135])
    assert robust_std(values) == 0.5 * (high - low)
    assert SIGMA_PERCENTILES == (15.865, 84.135)


def test_non_finite_values_are_ignored_and_too_few_give_nan(rng):
    values = rng.normal(size=30)
    dirty = np.r_[values, np.nan, np.inf, -np.inf]
    assert robust_std(dirty) == robust_std(values)
    assert np.isnan(robust_std([1.0, 2.0, 3.0, 4.0, np.nan]))  # 4 finite < min_count 5
    assert robust_std([1.0, 2.0, 3.0], min_count=3) == 0.5 * np.subtract(*np.percentile([1, 2, 3], [84.135, 15.865]))
    assert np.isnan(robust_std([], min_count=1)) and np.isnan(robust_std([np.nan], min_count=1, method="mad"))


def test_normal_data_give_sigma(rng):
    values = rng.normal(0.0, 2.0, 200_000)
    assert abs(robust_std(values) - 2.0) < 0.02
    assert abs(robust_std(values, method="mad") - 2.0) < 0.02


def test_mad_is_robust_scatter(rng):
    values = rng.standard_t(2, 101)
    expected = MAD_TO_SIGMA * np.median(np.abs(values - np.median(values)))
    assert robust_std(values, 1, method="mad") == expected
    assert robust_scatter(values) == expected and type(robust_scatter(values)) is float
    assert robust_scatter([1.0, 2.0, 3.0, 4.0, 100.0]) == MAD_TO_SIGMA


def test_dtype_none_computes_on_the_values_as_given_and_float_converts_first(rng):
    values = rng.normal(size=51).astype(np.float32)
    low, high = np.percentile(values, [15.865, 84.135])
    assert robust_std(values) == 0.5 * (high - low)
    mad32 = robust_std(values, method="mad")
    assert mad32.dtype == np.float32 and mad32 == MAD_TO_SIGMA * np.median(np.abs(values - np.median(values)))
    as64 = values.astype(np.float64)
    mad64 = robust_std(values, method="mad", dtype=float)
    assert mad64.dtype == np.float64 and mad64 == MAD_TO_SIGMA * np.median(np.abs(as64 - np.median(as64)))


@pytest.mark.parametrize("kwargs, match", [({"min_count": 0}, "min_count"), ({"min_count": 2.5}, "min_count"),
                                           ({"min_count": True}, "min_count"), ({"method": "iqr"}, "method")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        robust_std([1.0, 2.0, 3.0], **kwargs)


@pytest.mark.parametrize("module", ["stats", "bandlimit"])
def test_low_modules_import_nothing_of_the_package_but_errors(module):
    """Both layers (models and data) may import these, so they must sit below both (read from the source)."""
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "cannon_bridge" / f"{module}.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            imported.add(node.module or ".")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            imported.update(name for name in names if name.startswith("cannon_bridge"))
    assert imported == {"errors"}
