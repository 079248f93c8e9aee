"""The catalogue's measurements as a Gaussian term per star in the bridge's test step (issue 22's E-step):
its statistics against the direct sum, and the posterior it gives against the product of Gaussians."""
import numpy as np
import pytest

from cannon_bridge.backends.inference import evaluate
from cannon_bridge.bridge import BridgeModel
from cannon_bridge.bridge.inference import catalogue_block, infer_single
from cannon_bridge.mock import CORE_LABELS, make_crossmatch

CORE = CORE_LABELS[:3]


def test_catalogue_block_is_the_sum_of_squares_it_stands_for(rng):
    values, precision = rng.normal(size=(6, 4)), rng.uniform(0, 3, size=(6, 4))
    precision[0, 2] = 0.0  # a missing measurement counts nothing, whatever its value
    values[0, 2] = np.nan
    x = rng.normal(size=(6, 4))
    chi2, hessian, gradient = evaluate(x, [catalogue_block(values, precision)])
    want = np.nansum(precision * (x - np.nan_to_num(values)) ** 2, axis=1)
    np.testing.assert_allclose(chi2, want, rtol=1e-12)
    np.testing.assert_allclose(hessian, precision[:, :, None] * np.eye(4)[None], rtol=1e-12)
    np.testing.assert_allclose(gradient, -precision * (x - np.nan_to_num(values)), rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def small_bridge():
    data = make_crossmatch(160, seed=5, missing_fraction=0.0)
    # the plain chi^2 (coefficients taken as exact): a likelihood, whose product with the catalogue's
    # Gaussian is the reference (the debiased chi^2 is an estimating equation, not a likelihood)
    model = BridgeModel(CORE, [], backend="numba", calibrate=False, apogee_regularization=30.0,
                        galah_regularization=30.0, coefficient_uncertainty=False).fit(data.subset(np.arange(120)))
    return model, data.subset(np.arange(120, 160))


def test_posterior_with_the_catalogue_is_the_product_of_the_two_gaussians(small_bridge):
    model, test = small_bridge
    fitted = model.fitted_bridge()
    spectra = dict(apogee_flux=test.apogee_flux, apogee_ivar=test.apogee_ivar, galah_flux=test.galah_flux,
                   galah_ivar=test.galah_ivar)
    alone = infer_single(fitted, **spectra, keep_information=True)
    x_alone = fitted.scaled(alone.labels)
    information = alone.likelihood_information + (0 if alone.prior_information is None else alone.prior_information)
    # a catalogue value 1 sigma (of the spectra's posterior) off, with the spectra's own precision
    sigma = np.sqrt(np.einsum("sii->si", np.linalg.inv(information)))
    values = x_alone + sigma
    precision = 1.0 / sigma**2
    joint = infer_single(fitted, **spectra, catalogue=(values, precision))
    want = np.linalg.solve(information + precision[:, :, None] * np.eye(len(CORE))[None],
                           (np.einsum("skl,sl->sk", information, x_alone) + precision * values)[:, :, None])[:, :, 0]
    # the spectra's chi^2 is quadratic near its minimum: the two agree to a small part of a sigma
    assert np.all(np.abs(fitted.scaled(joint.labels) - want) < 0.1 * sigma)
    # and the catalogue narrows every label's posterior
    assert np.all(joint.uncertainties < alone.uncertainties)
    # without any measurement (precision 0) nothing changes
    same = infer_single(fitted, **spectra, catalogue=(values, np.zeros_like(precision)))
    # (the same sums in another order: equal within the test step's stopping tolerance)
    assert np.all(np.abs(same.labels - alone.labels) < 1e-3 * alone.uncertainties)
