"""Compute kernels: least squares, censoring, ridge/L1, intrinsic scatter; numpy vs numba."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.linalg
from scipy.optimize import brentq, minimize_scalar

from cannon_bridge import CannonModel
from cannon_bridge.backends import available_backends, get_backend
from cannon_bridge.engine import solve_with_regularization
from cannon_bridge.errors import InvalidInputError
from cannon_bridge.vectorizer import polynomial_exponents

CPU_BACKENDS = ["numpy", "numba"]


def relative_difference(a, b):
    scale = max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-300)
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / scale


def random_block(rng, n_stars=70, n_pixels=12, n_labels=2, order=2, zero_fraction=0.15):
    x = rng.uniform(-1.0, 1.0, size=(n_stars, n_labels))
    exponents = polynomial_exponents(n_labels, order)
    design = np.prod(x[:, None, :] ** exponents[None], axis=2)
    flux = 1.0 + rng.normal(size=(n_stars, n_pixels)) * 0.05
    weights = rng.uniform(0.3, 3.0, size=(n_stars, n_pixels)) * 1e4
    weights[rng.random(weights.shape) < zero_fraction] = 0.0
    return design, weights, flux


def negative_log_marginal(v, r2, var):
    return 0.5 * np.sum(r2 / (var + v) + np.log(var + v))


# ---------------------------------------------------------------- get_backend
def test_available_backends_and_unknown_name():
    names = available_backends()
    assert names[0] == "numpy" and "numba" in names
    for name in CPU_BACKENDS:
        backend = get_backend(name)
        assert backend.name == name and backend.xp is np
    assert get_backend("auto").name in names
    with pytest.raises(InvalidInputError, match="'backend' parameter must be one of"):
        get_backend("tensorflow")


# ------------------------------------------------------- normal equations
@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_solve_normal_equations_equals_lstsq(backend_name, rng):
    design, weights, flux = random_block(rng)
    coef, ok = get_backend(backend_name).solve_normal_equations(design, weights, flux)
    coef, ok = np.asarray(coef), np.asarray(ok)
    assert ok.all()
    for m in range(flux.shape[1]):
        root = np.sqrt(weights[:, m])
        expected = scipy.linalg.lstsq(design * root[:, None], flux[:, m] * root)[0]
        assert relative_difference(coef[m], expected) < 1e-10


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_solve_normal_equations_censoring_and_ridge(backend_name, rng):
    design, weights, flux = random_block(rng)
    n_pixels, n_terms = flux.shape[1], design.shape[1]
    active = rng.random((n_pixels, n_terms)) > 0.3
    active[:, 0] = True
    diagonal = rng.uniform(0.0, 50.0, size=(n_pixels, n_terms))
    coef, ok = get_backend(backend_name).solve_normal_equations(design, weights, flux, active=active,
                                                                 diagonal=diagonal)
    coef, ok = np.asarray(coef), np.asarray(ok)
    assert ok.all()
    assert np.all(coef[~active] == 0.0)  # exactly zero, not just small
    for m in range(n_pixels):
        use = active[m]
        sub = design[:, use]
        # ridge: minimise sum w r^2 + sum d theta^2 on the active terms only
        stacked = np.vstack([sub * np.sqrt(weights[:, m])[:, None], np.diag(np.sqrt(diagonal[m, use]))])
        target = np.concatenate([flux[:, m] * np.sqrt(weights[:, m]), np.zeros(use.sum())])
        expected = scipy.linalg.lstsq(stacked, target)[0]
        assert relative_difference(coef[m, use], expected) < 1e-10


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_singular_pixel_is_flagged_without_spoiling_the_block(backend_name, rng):
    design, weights, flux = random_block(rng, zero_fraction=0.0)
    weights[:, 3] = 0.0  # no data at all
    weights[3:, 5] = 0.0  # fewer stars than terms
    coef, ok = get_backend(backend_name).solve_normal_equations(design, weights, flux)
    coef, ok = np.asarray(coef), np.asarray(ok)
    assert not ok[3] and not ok[5]
    assert np.all(coef[[3, 5]] == 0.0)
    good = np.setdiff1d(np.arange(flux.shape[1]), [3, 5])
    assert ok[good].all()
    for m in good:
        root = np.sqrt(weights[:, m])
        expected = scipy.linalg.lstsq(design * root[:, None], flux[:, m] * root)[0]
        assert relative_difference(coef[m], expected) < 1e-10


@pytest.mark.parametrize("regularization", [1e4, 1e5])
@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_l1_regularisation_minimises_penalised_chi2(backend_name, regularization, rng):
    """IRLS solves min chi^2 + lambda * sum_{j>0} |theta_j|; compare with coordinate descent."""
    design, weights, flux = random_block(rng, n_stars=80, n_pixels=4, zero_fraction=0.0)
    n_terms = design.shape[1]
    coef, ok = solve_with_regularization(get_backend(backend_name), design, weights, flux,
                                          np.ones((flux.shape[1], n_terms), dtype=bool), regularization)
    assert ok.all()
    unregularised, _ = get_backend(backend_name).solve_normal_equations(design, weights, flux)
    for m in range(flux.shape[1]):
        gram = (design * weights[:, m, None]).T @ design
        rhs = (design * weights[:, m, None]).T @ flux[:, m]
        theta = np.linalg.solve(gram, rhs)
        for _ in range(3000):
            for j in range(n_terms):
                rho = rhs[j] - gram[j] @ theta + gram[j, j] * theta[j]
                shrink = 0.0 if j == 0 else regularization / 2
                theta[j] = np.sign(rho) * max(abs(rho) - shrink, 0.0) / gram[j, j]

        def objective(t):
            return np.sum(weights[:, m] * (flux[:, m] - design @ t) ** 2) + regularization * np.abs(t[1:]).sum()

        best = objective(theta)
        assert objective(coef[m]) <= best * (1 + 5e-3)
        assert objective(coef[m]) < objective(np.asarray(unregularised)[m])
        assert np.abs(coef[m, 1:]).sum() < np.abs(np.asarray(unregularised)[m, 1:]).sum()


# ------------------------------------------------------------------ scatter
@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_fit_scatter_maximises_marginal_likelihood(backend_name, rng):
    n_stars, n_pixels = 150, 6
    var = rng.uniform(0.5, 2.0, size=(n_stars, n_pixels)) * 1e-4
    true_s2 = np.array([0.0, 1e-5, 1e-4, 1e-3, 4e-3, 2e-4])
    residuals = rng.normal(size=(n_stars, n_pixels)) * np.sqrt(var + true_s2)
    observed = rng.random((n_stars, n_pixels)) > 0.2
    dof_factor = 1.07
    s2 = np.asarray(get_backend(backend_name).fit_scatter(residuals, var, observed, dof_factor))
    assert s2.shape == (n_pixels,) and np.all(s2 >= 0)
    for m in range(n_pixels):
        use = observed[:, m]
        r2 = residuals[use, m] ** 2 * dof_factor
        v = var[use, m]
        best = minimize_scalar(negative_log_marginal, bounds=(0.0, r2.max()), args=(r2, v), method="bounded",
                               options={"xatol": 1e-14})
        optimum = best.x if negative_log_marginal(best.x, r2, v) < negative_log_marginal(0.0, r2, v) else 0.0
        if optimum > 1e-9:
            assert s2[m] == pytest.approx(optimum, rel=1e-5)
        else:
            assert s2[m] <= 1e-9
        assert negative_log_marginal(s2[m], r2, v) <= negative_log_marginal(optimum, r2, v) + 1e-9
    assert s2[0] < s2[3] < s2[4]  # ordered like the true scatter


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("unit", [1e-50, 1e-20, 1e-8, 1e10])
def test_fit_scatter_does_not_depend_on_the_flux_unit(backend_name, rng, unit):
    """s^2 scales as unit^2: flux in tiny units (the stop's floor was a fixed 1e-30 in v, so 1e-20 took the
    first Newton step, 15% off) and huge ones (inv**3 overflowed in numpy below var ~ 1e-103) alike."""
    n_stars, n_pixels = 500, 8
    var = rng.uniform(0.5, 2.0, size=(n_stars, n_pixels)) * 1e-4
    residuals = rng.normal(size=(n_stars, n_pixels)) * np.sqrt(var + rng.uniform(0.5, 2.0, n_pixels) * 2e-5)
    observed = rng.random((n_stars, n_pixels)) > 0.1
    backend = get_backend(backend_name)
    reference = np.asarray(backend.fit_scatter(residuals, var, observed, 1.02))
    scaled = np.asarray(backend.fit_scatter(residuals * unit, var * unit**2, observed, 1.02)) / unit**2
    assert np.all(reference > 0)
    np.testing.assert_allclose(scaled, reference, rtol=1e-9)
    if backend_name == "numba":  # the fused kernel's copy
        from cannon_bridge.backends import _numba
        r2, work = np.empty(n_stars), np.empty(n_stars)
        for m in range(n_pixels):
            ivar = np.where(observed[:, m], 1.0 / (var[:, m] * unit**2), 0.0)
            fused = _numba._scatter_one(np.where(observed[:, m], residuals[:, m] * unit, 0.0), ivar, False, 1.02, 40,
                                        float((var[observed[:, m], m] * unit**2).sum()), int(observed[:, m].sum()),
                                        r2, work)
            assert fused / unit**2 == pytest.approx(reference[m], rel=1e-9)


def _gradient_root(r2, var):
    """The root in v of d ln L / dv = 1/2 sum [r2 / (var + v)^2 - 1 / (var + v)], by brentq to rounding."""
    def gradient(v):
        inv = 1.0 / (var + v)
        return 0.5 * np.sum(r2 * inv**2 - inv)

    return brentq(gradient, 0.0, r2.max(), xtol=1e-300, rtol=4 * np.finfo(float).eps, maxiter=500)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_fit_scatter_reaches_the_root_in_a_few_newton_steps(backend_name, rng):
    """Newton converges quadratically: 8 steps reach the root of the gradient to ~1e-12 on every pixel.
    A step that rounds onto the bracket's end (v itself) must stop the iteration, not bisect away from
    the root (it did: half the pixels then crawled back for all 40 steps and stopped ~1e-9 off)."""
    n_stars, n_pixels = 3000, 60
    var = rng.uniform(0.5, 2.0, size=(n_stars, n_pixels)) * 1e-4
    true_s2 = rng.uniform(0.2, 2.0, n_pixels) * 2.5e-5
    residuals = rng.normal(size=(n_stars, n_pixels)) * np.sqrt(var + true_s2)
    observed = np.ones((n_stars, n_pixels), dtype=bool)
    backend = get_backend(backend_name)
    s2 = np.asarray(backend.fit_scatter(residuals, var, observed, 1.0, n_iter=8))
    expected = np.array([_gradient_root(residuals[:, m] ** 2, var[:, m]) for m in range(n_pixels)])
    np.testing.assert_allclose(s2, expected, rtol=1e-11)
    if backend_name == "numba":  # the fused training kernel's copy of the iteration, per pixel
        from cannon_bridge.backends import _numba
        r2, work = np.empty(n_stars), np.empty(n_stars)
        fused = [_numba._scatter_one(residuals[:, m].copy(), 1.0 / var[:, m], False, 1.0, 8,
                                     float(var[:, m].sum()), n_stars, r2, work) for m in range(n_pixels)]
        np.testing.assert_allclose(fused, expected, rtol=1e-11)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_fit_scatter_is_zero_when_residuals_are_below_the_noise(backend_name, rng):
    var = np.full((100, 3), 1e-4)
    residuals = rng.normal(size=(100, 3)) * 1e-3  # ten times smaller than the noise
    observed = np.ones_like(residuals, dtype=bool)
    observed[:, 2] = False  # nothing observed: 0
    s2 = np.asarray(get_backend(backend_name).fit_scatter(residuals, var, observed, 1.0))
    np.testing.assert_array_equal(s2, 0.0)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_fit_scatter_noise_free_is_mean_square(backend_name, rng):
    """With no measurement noise the maximum is the (dof-corrected) mean square residual."""
    residuals = rng.normal(size=(50, 4)) * [0.01, 0.02, 0.05, 0.001]
    observed = rng.random((50, 4)) > 0.1
    s2 = np.asarray(get_backend(backend_name).fit_scatter(residuals, np.zeros_like(residuals), observed, 1.2))
    expected = [1.2 * np.mean(residuals[observed[:, m], m] ** 2) for m in range(4)]
    np.testing.assert_allclose(s2, expected, rtol=1e-10)


# --------------------------------------------- whole fit: numpy == numba
@pytest.mark.parametrize("regularization", [0.0, 30.0])
@pytest.mark.parametrize("censored", [False, True])
def test_numpy_and_numba_fits_agree(toy_survey, rng, censored, regularization):
    data = toy_survey(250, 60, n_labels=3, order=2, snr=80, scatter=np.linspace(0.0, 0.03, 60), seed=3)
    ivar = data["ivar"].copy()
    ivar[rng.random(ivar.shape) < 0.1] = 0.0
    names = ["teff", "logg", "feh"]
    censors = {"logg": np.arange(60) % 3 != 0, "feh": np.arange(60) < 40} if censored else None
    models = [CannonModel(names, backend=b, regularization=regularization, censors=censors)
              .fit(data["flux"], data["labels"], ivar) for b in CPU_BACKENDS]
    assert relative_difference(models[0].coef_, models[1].coef_) < 1e-8
    assert relative_difference(models[0].scatter_, models[1].scatter_) < 1e-8
    np.testing.assert_array_equal(models[0].pixel_flags_, models[1].pixel_flags_)
    np.testing.assert_array_equal(models[0].coef_ == 0.0, models[1].coef_ == 0.0)
    assert np.sum(models[0].scatter_ > 0) > 30  # the comparison covers fitted scatter, not only zeros
    results = [m.infer(data["flux"][:5], data["ivar"][:5]) for m in models]
    # coefficients equal to 1e-8 give labels equal far inside the test step's stopping tolerance (~0.014 sigma)
    assert np.all(np.abs(results[0].labels - results[1].labels) < 1e-3 * results[0].uncertainties)


# ------------------------------------ the GPU driver path, run on numpy arrays
def test_strict_device_module_refuses_what_cupy_refuses():
    """The stand-in for CuPy (tests/strict_device.py) must be strict, or the device-path tests below
    would pass on code that fails on a GPU: host arrays mixed into device arithmetic or functions,
    implicit conversion to numpy and writes through einsum's diagonal are all caught."""
    from strict_device import DeviceArray, HostDeviceMixError, ImplicitTransferError, strict_module

    xp = strict_module()
    host = np.arange(6.0).reshape(2, 3)
    device = xp.asarray(host)
    assert isinstance(device, DeviceArray) and isinstance(device + 1.0, DeviceArray)
    assert isinstance(xp.linalg.cholesky(xp.asarray(np.eye(3))), DeviceArray)
    np.testing.assert_array_equal((device * 2.0).get(), host * 2.0)
    with pytest.raises(HostDeviceMixError):
        device + host
    with pytest.raises(HostDeviceMixError):
        xp.where(device > 1.0, host, 0.0)
    with pytest.raises(ImplicitTransferError):
        np.asarray(device)
    with pytest.raises(ImplicitTransferError):
        host[xp.asarray(np.array([0, 1]))]
    square = xp.asarray(np.eye(3)[None])
    xp.einsum("mii->mi", square)[...] += 1.0  # a copy on this module, as CuPy may give
    np.testing.assert_array_equal(square.get(), np.eye(3)[None])


def _device_backend(monkeypatch, module, modules):
    """Patch ``get_backend`` in ``modules`` so that backend='cupy' is the device driver on ``module``."""
    from cannon_bridge.backends._cupy import array_module_backend

    calls = []

    def fake_get_backend(name="auto", _real=get_backend):
        if name == "cupy":
            calls.append(name)
            return array_module_backend(module, name="cupy")
        return _real(name)

    for target in modules:
        monkeypatch.setattr(target, "get_backend", fake_get_backend)
    return calls


@pytest.mark.parametrize("strict", [False, True], ids=["numpy-module", "strict-device-module"])
@pytest.mark.parametrize("censored", [False, True])
def test_device_code_path_equals_numpy_backend(toy_survey, rng, monkeypatch, censored, strict):
    """backend='cupy' runs the numpy kernels through the device driver (blocks moved to the array
    module and back). CI has no GPU, so the same driver runs here with numpy as the module, and with
    a CuPy-like module that refuses host/device mixing (tests/strict_device.py); on a GPU,
    benchmarks/bench_gpu.py checks cupy against numpy to 1e-8."""
    import cannon_bridge.model as model_module
    from strict_device import strict_module

    calls = _device_backend(monkeypatch, strict_module() if strict else np, [model_module])

    data = toy_survey(200, 40, n_labels=3, order=2, snr=80, scatter=np.linspace(0.0, 0.02, 40), seed=5)
    ivar = data["ivar"].copy()
    ivar[rng.random(ivar.shape) < 0.1] = 0.0
    names = ["teff", "logg", "feh"]
    censors = {"feh": np.arange(40) < 25} if censored else None
    # float32 inputs: the device path accumulates in float64 like the host path
    flux32 = data["flux"].astype(np.float32)
    device = CannonModel(names, backend="cupy", censors=censors, regularization=10.0).fit(flux32, data["labels"], ivar)
    host = CannonModel(names, backend="numpy", censors=censors, regularization=10.0).fit(flux32, data["labels"], ivar)
    assert calls, "the device driver was not used"
    assert relative_difference(device.coef_, host.coef_) < 1e-10
    assert relative_difference(device.scatter_, host.scatter_) < 1e-10
    a, b = device.infer(data["flux"][:20], data["ivar"][:20]), host.infer(data["flux"][:20], data["ivar"][:20])
    np.testing.assert_allclose(a.labels, b.labels, rtol=1e-9)
    np.testing.assert_allclose(a.covariance, b.covariance, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("with_ivar", [True, False])
def test_fit_pixels_with_star_mask_agrees_between_backends(toy_survey, rng, with_ivar):
    """The numba fused block kernels (masks, weights, reweighting) equal the numpy reference, with a
    per-pixel star mask (the bridge's missing labels) and without ivar (noise-free training)."""
    from cannon_bridge.engine import fit_pixels

    data = toy_survey(120, 30, n_labels=2, order=2, snr=60, scatter=np.linspace(0.0, 0.02, 30), seed=8)
    x = (data["labels"] - data["pivots"]) / data["scales"]
    design = np.prod(x[:, None, :] ** data["exponents"][None], axis=2)
    star_mask = rng.random(data["flux"].shape) > 0.2
    active = np.ones((30, design.shape[1]), bool)
    ivar = data["ivar"].astype(np.float32) if with_ivar else None
    results = [fit_pixels(design, data["flux"].astype(np.float32), ivar, active, get_backend(name),
                          regularization=5.0, star_mask=star_mask) for name in CPU_BACKENDS]
    for a, b in zip(results[0][:2], results[1][:2]):
        assert relative_difference(a, b) < 1e-8
    np.testing.assert_array_equal(results[0][2], results[1][2])


# ------------------------------- numba fused training kernel (few terms, with or without L1)
@pytest.mark.parametrize("with_ivar", [True, False])
@pytest.mark.parametrize("with_star_mask", [False, True])
@pytest.mark.parametrize("censored", [False, True])
@pytest.mark.parametrize("regularization", [0.0, 20.0])
def test_fused_numba_training_equals_numpy_reference(toy_survey, rng, monkeypatch, with_ivar, with_star_mask,
                                                     censored, regularization):
    """backend='numba' trains few-term models with one fused kernel per block (``_numba.fit_fused``):
    every pass (normal matrices, Cholesky or reweighted-L1 solves, residuals, scatter, reweighting) per
    tile of pixels. It equals the numpy reference with censoring, star masks, missing ivar, ivar == 0
    stars, pixels without data or with too few stars, float32 inputs and partial tiles."""
    import cannon_bridge.model as model_module
    from cannon_bridge.backends import _numba
    from cannon_bridge.engine import PixelFlag, fit_pixels, typical_noise_variance

    n_pixels = 45  # partial tiles and partial groups of 4 pixels
    data = toy_survey(150, n_pixels, n_labels=3, order=2, snr=60, scatter=np.linspace(0.0, 0.03, n_pixels), seed=11)
    x = (data["labels"] - data["pivots"]) / data["scales"]
    design = np.prod(x[:, None, :] ** data["exponents"][None], axis=2)
    n_terms = design.shape[1]
    ivar = np.broadcast_to(data["ivar"], data["flux"].shape).copy()
    ivar[rng.random(ivar.shape) < 0.1] = 0.0
    ivar[:, 3] = 0.0  # no data at all
    ivar[n_terms - 2:, 7] = 0.0  # fewer stars than terms
    flux = data["flux"].copy()
    flux[ivar == 0] = np.nan if with_ivar else 0.0  # never read where ivar is 0
    star_mask = rng.random(flux.shape) > 0.2 if with_star_mask else None
    if not with_ivar and star_mask is not None:
        star_mask[:, 3] = False
        star_mask[n_terms - 2:, 7] = False
    active = np.ones((n_pixels, n_terms), bool)
    if censored:
        involves_feh = data["exponents"][:, 2] > 0
        active[::3, involves_feh] = False
        active[5, 1:] = False  # constant only
    calls = []
    real_fused = _numba.fit_fused

    def spy(*args, **kwargs):
        calls.append(1)
        return real_fused(*args, **kwargs)

    backend = dataclasses.replace(get_backend("numba"), fit_fused=spy)  # a Backend is frozen: a spying copy
    iv = ivar.astype(np.float32) if with_ivar else None
    flux32 = np.where(np.isnan(flux), 0.0, flux).astype(np.float32) if not with_ivar else flux.astype(np.float32)
    results = [fit_pixels(design, flux32, iv, active, b, block_size=16, star_mask=star_mask,
                          regularization=regularization, return_noise_variance=True)
               for b in (get_backend("numpy"), backend)]
    assert calls, "the fused kernel was not used"
    coef, s2, flags, noise = results[1]
    assert relative_difference(results[0][0], coef) < 1e-8
    assert relative_difference(results[0][1], s2) < 1e-8
    np.testing.assert_array_equal(results[0][2], flags)
    np.testing.assert_allclose(results[0][3], noise, rtol=1e-12)
    np.testing.assert_allclose(noise, typical_noise_variance(iv, n_pixels, get_backend("numba")), rtol=1e-12)
    if with_ivar or with_star_mask:
        assert flags[3] == PixelFlag.NO_DATA and flags[7] == PixelFlag.NO_DATA
    assert np.sum(s2 > 0) > 20
    if censored:
        assert np.all(coef[5, 1:] == 0.0) and np.all(coef[::3][:, data["exponents"][:, 2] > 0] == 0.0)
    # the whole model takes the same path, with L1 too
    monkeypatch.setattr(model_module, "get_backend", lambda name="auto": backend if name == "numba"
                        else get_backend(name))
    calls.clear()
    CannonModel(["a", "b", "c"], backend="numba", regularization=regularization).fit(data["flux"], data["labels"],
                                                                                    ivar)
    assert calls


def test_fused_kernel_skips_only_passes_that_would_repeat(toy_survey):
    """Pixels whose scatter is at the fixed point after a pass (e.g. s = 0) skip the later passes; the
    count it reports is what benchmarks divide by, and skipping changes no result: the coefficients
    and scatter equal those of a numpy fit that runs every pass."""
    from cannon_bridge.backends import _numba
    from cannon_bridge.engine import fit_pixels

    n_pixels = 40
    scatter = np.where(np.arange(n_pixels) % 2 == 0, 0.0, 0.05)  # even pixels: none; odd: 5x the noise
    data = toy_survey(400, n_pixels, n_labels=3, order=2, snr=100, scatter=scatter, seed=5)
    x = (data["labels"] - data["pivots"]) / data["scales"]
    design = np.prod(x[:, None, :] ** data["exponents"][None], axis=2)
    ivar = np.broadcast_to(data["ivar"], data["flux"].shape).copy()
    active = np.ones((n_pixels, design.shape[1]), bool)
    n_passes = 4
    dof_factor = len(design) / (len(design) - design.shape[1])  # as fit_pixels
    coef, ok, s2, counts, _, passes = _numba.fit_fused(data["flux"], ivar, None, design, active, n_passes, dof_factor)
    assert ok.all() and passes.dtype.kind == "i"
    assert np.all((passes >= 1) & (passes <= n_passes))
    np.testing.assert_array_equal(passes[s2 == 0], 1)  # s = 0 after the first pass: that pass is the fit
    # real scatter: at least the pass that weighs with the first s > 0 (some reach the fixed point bit for
    # bit after it)
    assert np.all(passes[1::2] >= 2) and np.all(s2[1::2] > 0)
    assert np.sum(s2[::2] == 0) >= 5  # the test exercises the skip
    reference = fit_pixels(design, data["flux"], ivar, active, get_backend("numpy"), scatter_iterations=n_passes - 1)
    assert relative_difference(reference[0], coef) < 1e-8
    assert relative_difference(reference[1], s2) < 1e-8


def test_fused_numba_kernel_flags_singular_pixels(rng):
    """A pixel whose observed stars cannot constrain every term is SOLVE_FAILED on both backends."""
    from cannon_bridge.engine import PixelFlag, fit_pixels

    n_stars, n_pixels = 80, 9
    x = rng.uniform(-1, 1, size=(n_stars, 2))
    x[:40, 1] = 0.25  # the first 40 stars share one value of the second label
    design = np.prod(x[:, None, :] ** polynomial_exponents(2, 2)[None], axis=2)
    flux = 1.0 + 0.1 * x[:, :1] + rng.normal(0, 0.01, (n_stars, n_pixels))
    ivar = np.full(flux.shape, 1e4)
    ivar[40:, 2] = 0.0  # at pixel 2 the second label never varies: singular normal matrix
    active = np.ones((n_pixels, design.shape[1]), bool)
    results = [fit_pixels(design, flux, ivar, active, get_backend(name), block_size=4) for name in CPU_BACKENDS]
    assert results[0][2][2] == PixelFlag.SOLVE_FAILED
    np.testing.assert_array_equal(results[0][2], results[1][2])
    for a, b in zip(results[0][:2], results[1][:2]):
        assert relative_difference(a, b) < 1e-8


# ----------------------- numba reweighted-L1 kernel (every reweighting of a block in one call)
@pytest.mark.parametrize("regularization", [0.0, 10.0, 100.0])
@pytest.mark.parametrize("n_labels,order", [(2, 2), (5, 3)])
def test_reweighted_l1_kernel_equals_numpy_loop(rng, n_labels, order, regularization):
    """``_numba.solve_reweighted`` (distinct products, one kernel for the 7 solves) equals the numpy
    reweighting loop: censored terms exactly 0, singular pixels (no data, fewer stars than terms, a
    fewer stars than terms) flagged the same way, coefficients to 1e-8."""
    numba_backend = get_backend("numba")
    assert numba_backend.solve_reweighted is not None
    design, weights, flux = random_block(rng, n_stars=150, n_pixels=40, n_labels=n_labels, order=order)
    n_terms = design.shape[1]
    active = rng.random((40, n_terms)) > 0.2
    active[:, 0] = True
    weights[:, 3] = 0.0  # no data
    weights[3:, 5] = 0.0  # fewer stars than terms
    weights[:, 7] = 0.0
    weights[:4, 7] = 1e4
    active[7] = True
    results = [solve_with_regularization(get_backend(name), design, weights, flux, active, regularization)
               for name in CPU_BACKENDS]
    (coef_np, ok_np), (coef_nb, ok_nb) = [(np.asarray(c), np.asarray(o)) for c, o in results]
    np.testing.assert_array_equal(ok_np, ok_nb)
    # without L1 the singular pixels fail; with it the first solve fails (coef 0) and the huge ridge that
    # follows makes the later ones succeed - the same on both backends
    assert not ok_nb[3]
    assert (not ok_nb[5] and not ok_nb[7]) if regularization == 0 else (ok_nb[5] and ok_nb[7])
    assert ok_nb.sum() > 20
    assert np.all(coef_nb[~ok_nb] == 0.0)
    assert np.all(coef_nb[~active] == 0.0)
    for m in np.flatnonzero(ok_nb):
        assert relative_difference(coef_np[m], coef_nb[m]) < 1e-8
    # precomputed products (as fit_pixels passes them) give the same answer
    products = numba_backend.training_products(design)
    again = solve_with_regularization(numba_backend, design, weights, flux, active, regularization, products=products)
    np.testing.assert_array_equal(np.asarray(again[0]), coef_nb)


def test_reweighted_l1_kernel_without_active_and_with_diagonal(rng):
    """The generic per-pixel kernel (``solve_normal_equations`` with a ridge diagonal) and
    ``solve_reweighted`` with ``active=None`` equal the numpy reference for more terms than the fused
    kernel takes (cubic in 5 labels: 56 terms)."""
    from cannon_bridge.backends import _numba

    design, weights, flux = random_block(rng, n_stars=200, n_pixels=24, n_labels=5, order=3, zero_fraction=0.05)
    n_terms = design.shape[1]
    diagonal = rng.uniform(0.0, 1e3, size=(24, n_terms))
    pair = [get_backend(name).solve_normal_equations(design, weights, flux, diagonal=diagonal) for name in CPU_BACKENDS]
    np.testing.assert_array_equal(pair[0][1], pair[1][1])
    assert relative_difference(pair[0][0], pair[1][0]) < 1e-8
    coef, ok = _numba.solve_reweighted(design, weights, flux, None, 30.0)
    reference = solve_with_regularization(get_backend("numpy"), design, weights, flux,
                                           np.ones((24, n_terms), dtype=bool), 30.0)
    np.testing.assert_array_equal(ok, reference[1])
    assert relative_difference(coef, reference[0]) < 1e-8


@pytest.mark.parametrize("with_ivar", [True, False])
def test_fit_pixels_l1_many_terms_with_star_mask_agrees_between_backends(toy_survey, rng, with_ivar):
    """Training with L1 and more terms than the fused kernel (3 labels, cubic: 20 terms; 56 would need
    more stars than a quick test) through the reweighted kernel, with a star mask, float32 inputs and
    without ivar: coefficients, scatter and flags equal the numpy reference."""
    from cannon_bridge.engine import fit_pixels

    data = toy_survey(160, 24, n_labels=3, order=3, snr=60, scatter=np.linspace(0.0, 0.02, 24), seed=11)
    x = (data["labels"] - data["pivots"]) / data["scales"]
    design = np.prod(x[:, None, :] ** data["exponents"][None], axis=2)
    n_terms = design.shape[1]
    star_mask = rng.random(data["flux"].shape) > 0.2
    star_mask[:, 4] = False  # a pixel without stars: NO_DATA on both
    active = rng.random((24, n_terms)) > 0.15
    active[:, 0] = True
    ivar = data["ivar"].astype(np.float32) if with_ivar else None
    results = [fit_pixels(design, data["flux"].astype(np.float32), ivar, active, get_backend(name),
                          regularization=30.0, star_mask=star_mask, block_size=16) for name in CPU_BACKENDS]
    for a, b in zip(results[0][:2], results[1][:2]):
        assert relative_difference(a, b) < 1e-8
    np.testing.assert_array_equal(results[0][2], results[1][2])
    assert results[1][2][4] != 0 and np.sum(results[1][2] == 0) > 20


@pytest.mark.parametrize("regularization", [0.0, 30.0])
def test_cubic_five_label_model_agrees_between_backends(rng, regularization):
    """56 terms (above the fused kernel's limit) with and without L1: CannonModel on numba (distinct
    products, reweighted kernel) equals numpy in coefficients, scatter and flags."""
    n_stars, n_pixels = 400, 30
    labels = rng.normal(size=(n_stars, 5))
    flux = (1.0 + 0.02 * labels @ rng.normal(size=(5, n_pixels)) + 0.01 * (labels**2) @ rng.normal(size=(5, n_pixels))
            + rng.normal(scale=0.01, size=(n_stars, n_pixels)))
    ivar = np.full(flux.shape, 1e4)
    ivar[rng.random(ivar.shape) < 0.1] = 0.0
    models = [CannonModel(list("abcde"), order=3, regularization=regularization, backend=name).fit(flux, labels, ivar)
              for name in CPU_BACKENDS]
    assert models[0].coef_.shape == (n_pixels, 56)
    assert relative_difference(models[0].coef_, models[1].coef_) < 1e-8
    assert relative_difference(models[0].scatter_, models[1].scatter_) < 1e-8
    np.testing.assert_array_equal(models[0].pixel_flags_, models[1].pixel_flags_)


def test_distinct_products_keep_one_column_per_monomial(rng):
    """numba's training products: every packed product a_i a_j maps to a kept row equal to it, and the
    kept rows are the distinct monomials (degree <= 4 in 4 labels: C(8, 4) = 70 of 120 products)."""
    from math import comb

    from cannon_bridge.backends._numba import distinct_products
    from cannon_bridge.backends.packed import packed_products

    labels = rng.normal(size=(500, 4))
    design = np.prod(labels[:, None, :] ** polynomial_exponents(4, 2)[None], axis=2)
    products_t, packed_map = distinct_products(design)
    packed = packed_products(design)
    assert products_t.shape == (comb(8, 4), 500) and packed_map.shape == (packed.shape[1],)
    np.testing.assert_allclose(products_t[packed_map].T, packed, rtol=1e-12, atol=1e-12)
    # the kept rows differ from one another on every pair
    gram = np.corrcoef(products_t[1:])  # row 0 is the constant
    assert np.all(np.abs(gram[np.triu_indices(len(gram), 1)]) < 1 - 1e-9)
    # a design with a repeated column: the repeats collapse onto one row
    twice = np.column_stack([design, design[:, 3]])
    products_twice, map_twice = distinct_products(twice)
    assert products_twice.shape[0] == products_t.shape[0]
    np.testing.assert_allclose(products_twice[map_twice].T, packed_products(twice), rtol=1e-12, atol=1e-12)


def test_median_snr_kernel_equals_nanmedian(rng):
    """The test step's LOW_SNR flag reads a per-star median S/N: the numba kernel equals np.nanmedian of the
    masked S/N array (odd and even counts of used pixels, a star with none gets 0)."""
    from cannon_bridge.backends import _numba

    flux = rng.normal(1.0, 0.3, (9, 41))
    ivar = rng.uniform(10.0, 1e4, flux.shape)
    used = rng.random(flux.shape) > 0.3
    used[0] = False
    used[1, :] = False
    used[1, :4] = True  # an even count
    used[2, :] = False
    used[2, :5] = True  # an odd count
    snr = np.where(used, np.abs(flux) * np.sqrt(ivar), np.nan)
    expected = np.zeros(len(snr))
    expected[1:] = np.nanmedian(snr[1:], axis=1)
    np.testing.assert_array_equal(_numba.median_snr(flux, ivar, used), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_typical_noise_variance_kernel_equals_a_numpy_sum(rng, dtype):
    """The bridge's per-pixel noise variance (mean 1/ivar over the observed stars) from the numba kernel, on a
    strided view with masked pixels and a pixel no star observes, equals the numpy reference path."""
    from cannon_bridge.engine import typical_noise_variance

    ivar = rng.uniform(10.0, 1e4, (1100, 1300)).astype(dtype)
    ivar[rng.random(ivar.shape) < 0.2] = 0.0
    ivar[:, 7] = 0.0
    view = ivar[::2, 3:1203]  # rows strided, columns offset: no copy is made
    inverse = np.where(view > 0, 1.0 / np.where(view > 0, view.astype(np.float64), 1.0), 0.0)
    count = (view > 0).sum(axis=0)
    expected = np.where(count > 0, inverse.sum(axis=0) / np.maximum(count, 1), 0.0)
    got = typical_noise_variance(view, view.shape[1], get_backend("numba"))
    assert got[4] == 0.0  # pixel 7 of the full array: nobody observed it
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # the numpy reference (the host helpers without numba) gives the same values
    np.testing.assert_allclose(typical_noise_variance(view, view.shape[1], get_backend("numpy")), expected,
                               rtol=1e-12)


@pytest.mark.parametrize("n_labels, order", [(3, 2), (5, 3), (12, 2)])
def test_numba_test_step_equals_the_numpy_levenberg_marquardt(rng, n_labels, order):
    """The numba backend's star-by-star LM (one projected block, no prior) converges where the array-code LM
    does, from the same starts, with the same chi^2 and Gauss-Newton Hessian; several starts of a star
    share its statistics (star_of) instead of copies."""
    from cannon_bridge.backends import _numba
    from cannon_bridge.backends.inference import LikelihoodBlock, levenberg_marquardt
    from cannon_bridge.vectorizer import PolynomialVectorizer

    names = [f"l{k}" for k in range(n_labels)]
    vectorizer = PolynomialVectorizer(names, order=order, pivots=np.zeros(n_labels), scales=np.ones(n_labels))
    exponents = vectorizer.term_exponents
    n_pixels, n_stars = 300, 40
    coef = rng.normal(0.0, 0.05, (n_pixels, exponents.shape[0]))
    coef[:, 0] = 1.0
    truth = rng.uniform(-0.8, 0.8, (n_stars, n_labels))
    flux = vectorizer.design_matrix_scaled(truth) @ coef.T + rng.normal(0.0, 0.01, (n_stars, n_pixels))
    weights = np.full(flux.shape, 1e4)
    weights[rng.random(flux.shape) < 0.1] = 0.0
    block = LikelihoodBlock(coef, weights, flux, exponents, np.arange(n_labels)).project()
    starts = np.concatenate([np.zeros((n_stars, n_labels)), truth + rng.normal(0.0, 0.2, truth.shape)])
    star_of = np.tile(np.arange(n_stars), 2)
    expected = levenberg_marquardt(starts, [block.subset(star_of)], max_iter=100)
    got = _numba.lm_projected(starts, star_of, block.gram, block.rhs, block.flux_norm, exponents, max_iter=100)
    assert np.all(expected[3]) and np.all(got[3])  # every start converged in both
    np.testing.assert_allclose(got[0], expected[0], atol=2e-5)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(got[2], expected[2], rtol=1e-5, atol=1e-6 * np.abs(expected[2]).max())
    # and the answer is the truth within the noise
    sigma = np.sqrt(np.einsum("sii->si", np.linalg.inv(got[2][:n_stars])))
    assert np.all(np.abs(got[0][n_stars:] - truth) < 6 * sigma)


# ------------------------------- test-step starts from the projected statistics
def test_starts_from_projected_statistics_equal_pixel_by_pixel_sums(rng):
    """The starts of the test step come from each chunk's projected statistics (G, b, |y|^2), not from a
    pass over the pixels: the template chi^2 at every grid point equals sum_m w (f - model)^2 over the
    pixels of every block, and the linear estimate equals the weighted least-squares fit of the constant
    and linear terms alone (two blocks over overlapping label subsets, as the bridge's pixel groups)."""
    from cannon_bridge.backends.inference import LikelihoodBlock, linear_estimate, template_chi2
    from cannon_bridge.backends.polynomial import monomials

    n_stars, n_labels, n_grid = 7, 4, 5
    specs = [(np.array([0, 1, 2]), 40), (np.array([0, 1, 3]), 30)]  # (label index, pixels) per block
    blocks, raw = [], []
    for index, n_pixels in specs:
        exponents = polynomial_exponents(len(index), 2)
        coef = rng.normal(0, 0.1, (n_pixels, len(exponents)))
        coef[:, 0] += 1.0
        truth = rng.uniform(-1, 1, (n_stars, n_labels))
        flux = monomials(truth[:, index], exponents) @ coef.T + rng.normal(0, 0.01, (n_stars, n_pixels))
        weights = rng.uniform(0.5, 2.0, (n_stars, n_pixels)) * 1e4
        weights[rng.random(weights.shape) < 0.1] = 0.0
        blocks.append(LikelihoodBlock(coef, weights, flux, exponents, index).project())
        raw.append((index, exponents, coef, weights, flux))
    grid = rng.uniform(-1, 1, (n_grid, n_labels))
    expected = np.zeros((n_stars, n_grid))
    for index, exponents, coef, weights, flux in raw:
        model = monomials(grid[:, index], exponents) @ coef.T  # (G, M)
        expected += np.einsum("sm,sgm->sg", weights, (flux[:, None, :] - model[None]) ** 2)
    np.testing.assert_allclose(template_chi2(blocks, grid), expected, rtol=1e-9)
    # linear terms only: f - c_0 = sum_k c_k x_k, weighted, every block's pixels in one system
    got = linear_estimate(blocks, n_labels)
    for s in range(n_stars):
        a_rows, y, w = [], [], []
        for index, exponents, coef, weights, flux in raw:
            linear = np.zeros((len(coef), n_labels))
            for j, row in enumerate(exponents):
                if row.sum() == 1:
                    linear[:, index[np.argmax(row)]] = coef[:, j]
            a_rows.append(linear)
            y.append(flux[s] - coef[:, 0])
            w.append(weights[s])
        a, y, w = np.vstack(a_rows), np.concatenate(y), np.concatenate(w)
        normal = a.T @ (w[:, None] * a)
        normal += 1e-6 * np.trace(normal) * np.eye(n_labels)
        reference = np.clip(np.linalg.solve(normal, a.T @ (w * y)), -3, 3)
        np.testing.assert_allclose(got[s], reference, rtol=1e-8, atol=1e-10)
    assert np.any(np.abs(got) > 0.1)  # not a trivial solution


def test_gathered_weights_of_a_chunk_equal_the_array_code(rng):
    """The bridge's test step builds a chunk's weights and flux in pixel-group order in one pass
    (``_numba.gather_weighted``): the same numbers as ivar / (1 + ivar s^2) and fancy indexing, and
    each row's count of used pixels; float32 inputs read in place."""
    from cannon_bridge.backends import effective_weights
    from cannon_bridge.backends._numba import add_block, gather_weighted

    flux = rng.normal(1.0, 0.1, (50, 300)).astype(np.float32)
    ivar = rng.uniform(10.0, 1e4, (50, 300)).astype(np.float32)
    ivar[rng.random(ivar.shape) < 0.2] = 0.0
    scatter_variance = rng.uniform(0.0, 1e-3, 300)
    rows = np.array([3, 4, 5, 17, 40])
    columns = rng.permutation(300)[:170]
    weights, values, counts = gather_weighted(flux, ivar, rows, columns, scatter_variance[columns])
    expected = effective_weights(ivar[rows], scatter_variance)[:, columns]
    np.testing.assert_array_equal(weights, expected)
    np.testing.assert_array_equal(values, flux[rows][:, columns].astype(np.float64))
    np.testing.assert_array_equal(counts, np.count_nonzero(expected > 0, axis=1))
    # and the merge of blocks into the union of terms adds exactly what the fancy-indexed add does
    gram = rng.normal(size=(4, 9, 9))
    block = rng.normal(size=(4, 5, 5))
    index = np.array([7, 0, 3, 8, 2])
    expected_gram = gram.copy()
    expected_gram[:, index[:, None], index[None, :]] += block
    add_block(gram, index, block)
    np.testing.assert_array_equal(gram, expected_gram)


@pytest.mark.parametrize("diagonal", [None, "ridge-on-every-term"])
def test_device_solve_finds_failed_factorisations_without_raising(rng, diagonal):
    """CuPy's batched Cholesky neither raises nor (by default) marks a matrix that is not positive
    definite; the stand-in returns a finite lower triangle there. The device solve must still give the
    numpy result pixel by pixel: a pixel without data, an indefinite but invertible normal matrix (LU
    alone would solve it), a rank-deficient pixel with data and a censored one among good pixels; with a
    ridge on every term a pixel without data is positive definite again and solved (coefficients 0), as
    numpy and numba do."""
    from cannon_bridge.backends._numpy import solve_normal_equations
    from cannon_bridge.backends.packed import packed_index, packed_products
    from strict_device import strict_module

    design, weights, flux = random_block(rng, n_stars=60, n_pixels=8, n_labels=2, zero_fraction=0.0)
    n_terms = design.shape[1]
    weights[:, 2] = 0.0  # no data
    weights[:, 5] = 0.0
    weights[:2, 5] = 1e4  # two stars for 6 terms: rank 2
    packed = weights.T @ packed_products(design)
    rhs = (weights * flux).T @ design
    indefinite = np.eye(n_terms)
    indefinite[0, 1] = indefinite[1, 0] = 2.0  # eigenvalues -1, 3 and 1: invertible, not positive definite
    rows, cols = packed_index(n_terms)
    packed[4] = indefinite[rows, cols] * 1e4
    active = np.ones((8, n_terms), dtype=bool)
    active[6, 3:] = False
    ridge = None if diagonal is None else np.full((8, n_terms), 0.3)
    host_coef, host_ok = solve_normal_equations(design, weights, flux, active=active, diagonal=ridge,
                                                normal=(packed, rhs))
    xp = strict_module()
    device_coef, device_ok = solve_normal_equations(
        xp.asarray(design), xp.asarray(weights), xp.asarray(flux), active=xp.asarray(active),
        diagonal=None if ridge is None else xp.asarray(ridge), normal=(xp.asarray(packed), xp.asarray(rhs)), xp=xp)
    np.testing.assert_array_equal(device_ok.get(), host_ok)
    np.testing.assert_allclose(device_coef.get(), host_coef, rtol=1e-10, atol=1e-12)
    assert not host_ok[4] and host_ok[6] and host_ok[2] == host_ok[5] == (diagonal is not None)
    numba_coef, numba_ok = get_backend("numba").solve_normal_equations(design, weights, flux, active=active,
                                                                         diagonal=ridge)
    real = np.ones(8, dtype=bool)
    real[4] = False  # the indefinite matrix was put in by hand: numba builds its own from the data
    np.testing.assert_array_equal(numba_ok[real], host_ok[real])


@pytest.mark.parametrize("n_rows", [1, 2, 3, 7, 35])
def test_both_register_blocks_of_the_gram_sums_equal_numpy(rng, n_rows):
    """The fused kernel sums weights x rows with the 4 x 3 register block on 32-register hosts and the
    4 x 2 block on 16-register ones (AVX2): both, whichever this host uses, equal the plain products."""
    from cannon_bridge.backends import _numba
    n_stars = 1037
    weights = rng.uniform(0.5, 2.0, (4, n_stars))
    rows = rng.normal(size=(n_rows, n_stars))
    n0, n1 = 13, 1000
    expected = weights[:, n0:n1] @ rows[:, n0:n1].T
    for kernel in (_numba._gram4x3, _numba._gram4x2):
        out = np.full((6, n_rows), 0.5)  # sums are added to what the rows hold; rows 4-5 are untouched
        kernel(weights[0], weights[1], weights[2], weights[3], rows, n0, n1, out, 3, 0, 2, 1)
        np.testing.assert_allclose(out[[3, 0, 2, 1]], expected + 0.5, rtol=1e-12)
        np.testing.assert_array_equal(out[4:], 0.5)
    assert _numba._gram4 is (_numba._gram4x3 if _numba._WIDE_REGISTERS else _numba._gram4x2)


def test_the_register_block_follows_the_compilation_target(monkeypatch):
    """4 x 3 needs 32 vector registers: chosen for AVX-512 targets only, the host's unless NUMBA_CPU_NAME and
    NUMBA_CPU_FEATURES name another (a portable cache compiled for 'generic' has 16)."""
    import numba

    from cannon_bridge.backends import _numba
    monkeypatch.setattr(numba.config, "CPU_NAME", "skylake-avx512")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+avx512f,+fma")
    assert _numba._wide_vector_registers()
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    assert not _numba._wide_vector_registers()
    monkeypatch.setattr(numba.config, "CPU_NAME", None)
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+avx512f")  # the features decide when given
    assert _numba._wide_vector_registers()
    monkeypatch.setattr(numba.config, "CPU_FEATURES", None)
    from llvmlite import binding
    host_wide = "+avx512f" in binding.get_host_cpu_features().flatten().split(",")
    assert _numba._wide_vector_registers() == host_wide


# ------------------------------- the declared interface and the numpy references
def _interface_backends():
    """Every Backend the package builds on this machine: numpy, numba and the device driver (numpy as the array
    module, and the strict CuPy stand-in)."""
    from cannon_bridge.backends._cupy import array_module_backend
    from strict_device import strict_module

    return [get_backend("numpy"), get_backend("numba"), array_module_backend(np, name="cupy"),
            array_module_backend(strict_module(), name="cupy")]


def test_every_kernel_of_the_interface_has_a_numpy_reference():
    """The Backend dataclass declares every kernel, required or optional, each with a reference in
    backends/_numpy.py; every backend is a Backend, fills every required kernel and leaves an optional one
    None or callable (no hasattr probing). The numpy backend is the references themselves."""
    from cannon_bridge.backends import KERNELS, Backend
    from cannon_bridge.backends import _numpy

    names = {item.name for item in dataclasses.fields(Backend)}
    assert set(KERNELS) <= names
    assert names - set(KERNELS) == {"name", "xp", "to_device", "to_host", "fused_max_terms"}
    optional = {"prepare_block", "reweight", "solve_reweighted", "training_products", "lm_projected", "fit_fused"}
    assert {name for name, spec in KERNELS.items() if not spec.required} == optional
    for spec in KERNELS.values():
        assert callable(getattr(_numpy, spec.reference)), spec.name
        assert spec.doc and spec.name in Backend.__doc__
    numpy_backend = get_backend("numpy")
    for spec in KERNELS.values():
        if spec.required:
            assert getattr(numpy_backend, spec.name) is getattr(_numpy, spec.reference)
        else:
            assert getattr(numpy_backend, spec.name) is None  # the generic array code runs instead
    for backend in _interface_backends():
        assert type(backend) is Backend
        for spec in KERNELS.values():
            value = getattr(backend, spec.name)
            assert callable(value) if spec.required else (value is None or callable(value)), (backend.name, spec)
        assert (backend.fit_fused is None) == (backend.fused_max_terms == 0)
    numba_backend = get_backend("numba")
    assert all(getattr(numba_backend, name) is not None for name in optional)
    with pytest.raises(dataclasses.FrozenInstanceError):
        numba_backend.fit_fused = None
    with pytest.raises(TypeError, match="required kernel 'median_snr'"):
        dataclasses.replace(numba_backend, median_snr=None)


def test_host_backend_is_numba_when_it_imports_else_numpy(monkeypatch):
    import cannon_bridge.backends as backends
    from cannon_bridge.errors import BackendUnavailableError

    assert backends.host_backend().name == "numba" and backends.host_backend("cupy").name == "numba"
    assert backends.host_backend("numpy").name == "numpy"
    # the device driver's host helpers are the host backend's
    device = _interface_backends()[3]
    assert device.median_snr is backends.host_backend().median_snr
    monkeypatch.setattr(backends, "_numba_available", lambda: False)
    assert backends.host_backend().name == "numpy"
    with pytest.raises(BackendUnavailableError):
        backends.get_backend("numba")
    with pytest.raises(InvalidInputError):
        backends.host_backend("tensorflow")


def _band_limit_inputs(rng, dtype):
    from cannon_bridge.preprocess import band_limit_plan

    wavelength = np.r_[np.linspace(4800, 4840, 700), np.linspace(5700, 5740, 600), np.linspace(6500, 6501, 15)]
    flux = (1 + 0.02 * rng.standard_normal((25, wavelength.size))).astype(dtype)
    ivar = rng.uniform(1e3, 4e3, flux.shape).astype(dtype)
    ivar[rng.random(flux.shape) < 0.02] = 0.0
    flux[2, 50], ivar[2, 50] = np.nan, 0.0  # unused: NaN flux
    flux[3, 60] = np.inf  # ivar > 0 but flux not finite: unused
    ivar[4, 70] = np.inf  # unused
    ivar[5, 80] = 1e-30  # used, a huge variance
    return flux, ivar, band_limit_plan(wavelength, 28000.0)


@pytest.mark.parametrize("implementation", ["numba", "strict-device"])
def test_host_helpers_equal_their_numpy_references(rng, implementation):
    """Each host helper of numba (and of the device driver on the strict CuPy stand-in, which takes the host
    backend's) gives its numpy reference's values on random input, float32 strided views included:
    median_snr, inverse_sums, gather_weighted and the effective weights, spectra_summary exactly;
    band_limited_block to 1e-12 (the kernel sums the taps with fused multiply-adds)."""
    from cannon_bridge.backends import _numpy as reference
    from cannon_bridge.backends import effective_weights

    backend = get_backend("numba") if implementation == "numba" else _interface_backends()[3]
    flux = rng.normal(1.0, 0.3, (40, 260))
    ivar = rng.uniform(10.0, 1e4, flux.shape)
    ivar[rng.random(flux.shape) < 0.2] = 0.0
    used = (ivar > 0) & (rng.random(flux.shape) > 0.1)
    used[0], used[1, 3:] = False, False  # a star with no used pixel, one with 3
    np.testing.assert_array_equal(backend.median_snr(flux, ivar, used), reference.median_snr(flux, ivar, used))
    np.testing.assert_array_equal(backend.median_snr(flux.astype(np.float32), ivar, used),
                                  reference.median_snr(flux.astype(np.float32), ivar, used))
    # inverse sums onto running totals, on a float32 strided view with an unobserved column
    view = ivar.astype(np.float32)[::2, 5:250]
    view[:, 7] = 0.0
    start_total, start_count = rng.normal(size=view.shape[1]), rng.integers(0, 5, view.shape[1])
    got = (start_total.copy(), start_count.copy())
    expected = (start_total.copy(), start_count.copy())
    backend.inverse_sums(view, *got)
    reference.inverse_sums(view, *expected)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    # the test step's gather, and the one definition of the weights
    rows, columns = np.array([3, 4, 4, 17, 39]), rng.permutation(260)[:170]
    scatter_variance = rng.uniform(0.0, 1e-3, columns.size)
    for f, i in [(flux, ivar), (flux.astype(np.float32), ivar.astype(np.float32))]:
        got = backend.gather_weighted(f, i, rows, columns, scatter_variance)
        expected = reference.gather_weighted(f, i, rows, columns, scatter_variance)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(expected[0], effective_weights(ivar[np.ix_(rows, columns)].astype(np.float32)
                                                                 .astype(np.float64), scatter_variance))
    # spectra_summary: every special value, both dtypes, strided
    special_flux, special_ivar = flux.copy(), ivar.copy()
    for k, value in enumerate([0.0, -0.0, -2.0, -np.inf, np.inf, np.nan, 1e-200, 3e5]):
        special_ivar[k, 3 * k] = value
    for k, value in enumerate([np.nan, np.inf, -np.inf, -3.5]):
        special_flux[k + 20, 5 * k] = value
        special_flux[k, 3 * k] = value
    for f, i in [(special_flux, special_ivar), (special_flux, None), (special_flux.astype(np.float32), special_ivar),
                 (special_flux[::3, 7:200], special_ivar[::3, 7:200].astype(np.float32)), (flux[:0], ivar[:0])]:
        np.testing.assert_array_equal(backend.spectra_summary(f, i), reference.spectra_summary(f, i))
    # band-limited blocks: scattered, repeated and unsorted columns across pieces, edges and masked pixels
    for dtype in (np.float64, np.float32):
        band_flux, band_ivar, (filter_index, taps) = _band_limit_inputs(rng, dtype)
        rows = np.array([7, 2, 11, 2, 3, 4, 5, 24])
        columns = np.r_[0, 9, 10, 49, 50, 51, 60, 70, 80, np.arange(100, 160), 689, 699, 700, 710, 1299, 1300, 1314,
                        71, 69]
        got = backend.band_limited_block(band_flux, band_ivar, rows, columns, filter_index, taps, dtype)
        expected = reference.band_limited_block(band_flux, band_ivar, rows, columns, filter_index, taps, dtype)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype == dtype
            np.testing.assert_allclose(a, b, rtol=1e-12 if dtype == np.float64 else 1e-6)
        assert np.sum(got[1] != band_ivar[np.ix_(rows, columns)]) > 300  # the filter acted


def test_band_limited_block_reference_equals_band_limit():
    """The numpy reference of band_limited_block is preprocess.band_limit on the whole array."""
    from cannon_bridge.backends._numpy import band_limited_block
    from cannon_bridge.preprocess import band_limit

    rng = np.random.default_rng(12)
    wavelength = np.r_[np.linspace(4800, 4840, 700), np.linspace(5700, 5740, 600), np.linspace(6500, 6501, 15)]
    flux = 1 + 0.02 * rng.standard_normal((25, wavelength.size))
    ivar = rng.uniform(1e3, 4e3, flux.shape)
    ivar[rng.random(flux.shape) < 0.02] = 0.0
    flux[2, 50], ivar[2, 50] = np.nan, 0.0
    from cannon_bridge.preprocess import band_limit_plan

    filter_index, taps = band_limit_plan(wavelength, 28000.0)
    expected = band_limit(flux, ivar, wavelength, 28000.0)
    got = band_limited_block(flux, ivar, np.arange(25), np.arange(wavelength.size), filter_index, taps, np.float64)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-13)


@pytest.mark.parametrize("with_ivar", [True, False])
def test_optional_numba_kernels_equal_their_numpy_references(toy_survey, rng, with_ivar):
    """The optional kernels (numba only) against the references in backends/_numpy.py: the elementwise
    block work and reweighting exactly, the reweighted-L1 solves, the fused training passes and the
    projected test step to the precision of their different orders of summation."""
    from cannon_bridge.backends import _numpy as reference
    from cannon_bridge.backends.inference import LikelihoodBlock

    numba_backend = get_backend("numba")
    n_pixels = 30
    data = toy_survey(160, n_pixels, n_labels=3, order=2, snr=60, scatter=np.linspace(0.0, 0.03, n_pixels), seed=9)
    x = (data["labels"] - data["pivots"]) / data["scales"]
    design = np.prod(x[:, None, :] ** data["exponents"][None], axis=2)
    ivar = np.broadcast_to(data["ivar"], data["flux"].shape).astype(np.float32)
    ivar[rng.random(ivar.shape) < 0.1] = 0.0
    ivar = ivar if with_ivar else None
    flux = data["flux"].astype(np.float32)
    star_mask = rng.random(flux.shape) > 0.2
    for mask in (None, star_mask):
        got, expected = numba_backend.prepare_block(flux, ivar, mask), reference.prepare_block(flux, ivar, mask)
        for a, b in zip(got, expected):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    observed = expected[2]
    scatter_variance = rng.uniform(0.0, 1e-3, n_pixels)
    scatter_variance[::4] = 0.0
    out_numba, out_numpy = np.full(flux.shape, np.nan), np.full(flux.shape, np.nan)
    numba_backend.reweight(ivar, observed, scatter_variance, out_numba)
    reference.reweight(ivar, observed, scatter_variance, out_numpy)
    np.testing.assert_array_equal(out_numba, out_numpy)
    # reweighted L1 with each backend's own training products
    active = np.ones((n_pixels, design.shape[1]), bool)
    active[::3, data["exponents"][:, 2] > 0] = False
    weights, f = expected[1], expected[0]
    for regularization in (0.0, 30.0):
        got = numba_backend.solve_reweighted(design, weights, f, active, regularization,
                                             products=numba_backend.training_products(design))
        want = reference.solve_reweighted(design, weights, f, active, regularization,
                                          products=reference.training_products(design))
        np.testing.assert_array_equal(got[1], want[1])
        assert relative_difference(got[0], want[0]) < 1e-9
        # every pass of the fused kernel
        n_passes, dof_factor = 3, len(design) / (len(design) - design.shape[1])
        got = numba_backend.fit_fused(flux, ivar, star_mask, design, active, n_passes, dof_factor,
                                      regularization=regularization)
        want = reference.fit_fused(flux, ivar, star_mask, design, active, n_passes, dof_factor,
                                   regularization=regularization)
        np.testing.assert_array_equal(got[1], want[1])
        assert relative_difference(got[0], want[0]) < 1e-8
        assert relative_difference(got[2], want[2]) < 1e-8
        np.testing.assert_array_equal(got[3], want[3])
        np.testing.assert_allclose(got[4], want[4], rtol=1e-12)
        assert np.all((got[5] >= 1) & (got[5] <= n_passes)) and np.all((want[5] >= 1) & (want[5] <= n_passes))
        np.testing.assert_array_equal(got[5][want[2] == 0], want[5][want[2] == 0])
    # the projected test step
    exponents = data["exponents"]
    coef = got[0]
    block = LikelihoodBlock(coef, np.where(observed, 1e4, 0.0)[:40], data["flux"][:40], exponents,
                            np.arange(exponents.shape[1])).project()
    starts = np.concatenate([np.zeros((40, 3)), x[:40] + rng.normal(0.0, 0.1, (40, 3))])
    star_of = np.tile(np.arange(40), 2)
    got = numba_backend.lm_projected(starts, star_of, block.gram, block.rhs, block.flux_norm, exponents)
    want = reference.lm_projected(starts, star_of, block.gram, block.rhs, block.flux_norm, exponents)
    np.testing.assert_array_equal(got[3], want[3])
    np.testing.assert_allclose(got[0], want[0], atol=2e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-7, atol=1e-6)
