"""Cross-validation by star, label and catalogue comparisons, model Jacobians."""
import numpy as np
import pytest
from astropy.table import Table

from cannon_bridge.errors import InvalidInputError, NotFittedError
from cannon_bridge.model import CannonModel
from cannon_bridge.validation import (compare_labels, compare_to_catalogue, cross_validate, group_folds,
                                      model_flux_jacobian, model_line_attribution, robust_scatter)


def _repeat_groups(n_stars, rng):
    """Star ids with 1-4 spectra per star, shuffled so repeats are not adjacent."""
    groups = np.repeat(np.arange(n_stars), rng.integers(1, 5, n_stars))
    return rng.permutation(groups)


class RecordingEstimator:
    """Remembers which star ids it was trained on; predicts the training mean."""

    def __init__(self):
        self.seen_ = None

    def get_params(self, deep=True):
        return {}

    def set_params(self, **params):
        return self

    def fit(self, ids, values):
        self.seen_ = set(np.asarray(ids).tolist())
        self.mean_ = float(np.mean(values))
        return self

    def predict(self, ids):
        return np.full(len(ids), self.mean_)


def test_repeat_spectra_of_a_star_never_straddle_folds(rng):
    groups = _repeat_groups(40, rng)
    assert len(groups) > 60  # there are repeats
    folds = group_folds(groups, n_splits=5)
    tested = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(tested), np.arange(len(groups)))  # every spectrum is tested exactly once
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
    # and the estimator of each fold never saw a star it is tested on
    result = cross_validate(RecordingEstimator(), (groups, rng.normal(size=len(groups))), groups, n_splits=5,
                            return_estimators=True)
    for (train, test), fitted in zip(result.folds, result.estimators):
        assert fitted.seen_ == set(groups[train].tolist()) and not fitted.seen_ & set(groups[test].tolist())
    assert np.all(result.test_fold >= 0) and np.all(np.isfinite(result.predictions))


def test_cross_validated_cannon_labels(toy_survey, rng):
    survey = toy_survey(120, 60, n_labels=3, snr=200, seed=3)
    # every star observed twice (independent noise): a star-level split keeps both spectra together
    flux = np.vstack([survey["flux"], survey["flux"] + rng.normal(0, 1 / 200, survey["flux"].shape)])
    labels = np.vstack([survey["labels"], survey["labels"]])
    groups = np.tile(np.arange(120), 2)
    result = cross_validate(lambda: CannonModel(["a", "b", "c"], backend="numpy"), (flux, labels), groups, n_splits=3)
    assert result.predictions.shape == labels.shape
    assert np.all(result.test_fold[:120] == result.test_fold[120:])
    table = compare_labels(labels, result.predictions, ["a", "b", "c"])
    spread = np.std(labels, axis=0)
    assert np.all(np.asarray(table["rms"]) < 0.1 * spread)


def test_cross_validate_bad_input(rng):
    x = rng.normal(size=(10, 2))
    with pytest.raises(InvalidInputError, match="one star id per row"):
        cross_validate(RecordingEstimator(), (x, x[:, 0]), np.arange(9))
    with pytest.raises(InvalidInputError, match="fewer than n_splits"):
        cross_validate(RecordingEstimator(), (x, x[:, 0]), np.repeat([0, 1], 5), n_splits=3)
    with pytest.raises(InvalidInputError, match="different numbers of rows"):
        cross_validate(RecordingEstimator(), (x, x[:5, 0]), np.arange(10))
    with pytest.raises(InvalidInputError, match="fit method or be a factory"):
        cross_validate(42, (x, x[:, 0]), np.arange(10))


def test_compare_labels_statistics_and_snr_bins(rng):
    n = 4000
    truth = rng.normal(size=(n, 2))
    noise = rng.normal(0, 0.1, (n, 2))
    noise[:40, 1] = 5.0  # outliers: RMS sees them, the robust scatter hardly does
    inferred = truth + noise + np.array([0.05, 0.0])
    inferred[0, 0] = np.nan  # left out of that label only
    uncertainty = np.full((n, 2), 0.2)
    snr = np.where(np.arange(n) < n // 2, 30.0, 100.0)
    table = compare_labels(truth, inferred, ["teff", "ba_fe"], uncertainty, snr)
    overall = {row["label"]: row for row in table[table["snr_bin"] == "all"]}
    assert overall["teff"]["n"] == n - 1 and overall["ba_fe"]["n"] == n
    assert np.isclose(overall["teff"]["bias"], 0.05, atol=0.01)
    assert np.isclose(overall["teff"]["robust_scatter"], 0.1, rtol=0.1)
    assert np.isclose(overall["teff"]["z_std"], 0.5, rtol=0.1)
    assert np.isclose(overall["teff"]["z_mean"], 0.25, atol=0.03)
    assert overall["ba_fe"]["rms"] > 0.4 and overall["ba_fe"]["robust_scatter"] < 0.12
    bins = table[table["label"] == "teff"]
    assert list(bins["snr_bin"]) == ["all", "20-40", "80-160"]  # empty bins are left out
    assert list(bins["n"][1:]) == [n // 2 - 1, n // 2]
    assert robust_scatter([np.nan]) != robust_scatter([np.nan])  # NaN when empty
    with pytest.raises(InvalidInputError, match="inferred has 3 rows"):
        compare_labels(truth, inferred[:3], ["teff", "ba_fe"])
    with pytest.raises(InvalidInputError, match="snr must have shape"):
        compare_labels(truth, inferred, ["teff", "ba_fe"], snr=snr[:5])
    with pytest.raises(InvalidInputError, match="increasing edges"):
        compare_labels(truth, inferred, ["teff", "ba_fe"], snr=snr, snr_bins=[10, 5])


def test_compare_to_catalogue(tmp_path, rng):
    catalogue = Table({"sobject_id": np.arange(100, 130), "TEFF": rng.uniform(4000, 6000, 30),
                       "E_TEFF": np.full(30, 50.0), "BA_FE": rng.normal(0, 0.2, 30)})
    # our table: two spectra of star 100, stars 100-119 only, ids as text, shuffled
    ids = np.r_[np.arange(100, 120), 100].astype(str)
    rows = np.array([int(i) - 100 for i in ids])
    ours = Table({"id": ids, "teff": catalogue["TEFF"][rows] + 30.0, "e_teff": np.full(21, 40.0),
                  "ba_fe": catalogue["BA_FE"][rows] - 0.1, "e_ba_fe": np.full(21, 0.05)})
    table = compare_to_catalogue(ours, catalogue, catalogue_id_column="sobject_id",
                                 label_map={"teff": "TEFF", "ba_fe": "BA_FE"},
                                 catalogue_uncertainty_map={"TEFF": "E_TEFF"}, plot_dir=tmp_path)
    assert table.meta["n_matched"] == 21
    row = table[table["label"] == "teff"][0]
    assert row["catalogue_label"] == "TEFF" and np.isclose(row["bias"], 30.0)
    assert np.isclose(row["z_mean"], 30.0 / np.hypot(40.0, 50.0))  # both uncertainties in quadrature
    assert np.isclose(table[table["label"] == "ba_fe"]["bias"][0], -0.1)
    for name in ("catalogue_one_to_one.png", "catalogue_residuals.png"):
        assert (tmp_path / name).stat().st_size > 1000
    with pytest.raises(InvalidInputError, match="repeats ids"):
        compare_to_catalogue(ours, Table({"id": ["100", "100"], "teff": [1.0, 2.0]}))
    with pytest.raises(InvalidInputError, match="no id of inferred_table"):
        compare_to_catalogue(ours, Table({"id": ["x"], "teff": [1.0]}))
    with pytest.raises(InvalidInputError, match="label_map"):
        compare_to_catalogue(ours, Table({"id": ["100"], "logg": [1.0]}))
    with pytest.raises(InvalidInputError, match="no id column 'star'"):
        compare_to_catalogue(ours, catalogue, id_column="star")


def test_model_flux_jacobian_matches_finite_differences(toy_survey):
    survey = toy_survey(150, 40, n_labels=3, seed=1)
    model = CannonModel(["teff", "logg", "ba_fe"], backend="numpy").fit(survey["flux"], survey["labels"],
                                                                         survey["ivar"])
    labels = survey["labels"][:4]
    jacobian = model_flux_jacobian(model, labels)
    assert jacobian.shape == (4, 40, 3)
    step = np.array([1.0, 1e-3, 1e-3])
    for k in range(3):
        up, down = labels.copy(), labels.copy()
        up[:, k] += step[k]
        down[:, k] -= step[k]
        numeric = (model.generate(up) - model.generate(down)) / (2 * step[k])
        assert np.allclose(jacobian[:, :, k], numeric, atol=1e-6)
    assert model_flux_jacobian(model, labels, pixels=[0, 5]).shape == (4, 2, 3)
    with pytest.raises(NotFittedError):
        model_flux_jacobian(CannonModel(), labels)
    with pytest.raises(InvalidInputError, match="no wavelength grid"):
        model_line_attribution(model, {"Ba": [5853.7]}, labels, resolution=28000.0)
