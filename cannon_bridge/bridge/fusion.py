"""The joint mode: the GALAH posterior updated by APOGEE's estimate of the labels both measure.

Both surveys' models learn from one training set, so their label errors correlate; the update
uses that correlation as measured on held-out stars (:func:`correlated_update`). For labels APOGEE
knows only through the prior, cross-validation picks the Kalman update of independent errors or a
fixed blend (:func:`calibrate_fusion`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from ..engine import BridgeInferenceResult
from .state import FUSION_BLEND, FUSION_CORRELATED, FUSION_KALMAN, FittedBridge

__all__ = ["FusionChoice", "calibrate_fusion", "combination_covariance", "correlated_update", "error_correlation",
           "fuse", "fuse_update", "rescale_variance"]

logger = logging.getLogger("cannon_bridge.bridge")


@dataclass(frozen=True)
class FusionChoice:
    """What :func:`calibrate_fusion` chose: the correlation of both surveys' held-out label errors, and per
    label the combination (``FUSION_*``) with the APOGEE weight of a fixed blend (NaN otherwise)."""

    correlation: np.ndarray
    methods: np.ndarray
    weights: np.ndarray


def fuse(fitted: FittedBridge, from_apogee, from_galah, weighting=None) -> BridgeInferenceResult:
    """Joint labels: the GALAH posterior updated by APOGEE's calibrated constraint on its labels.

    Both estimates' covariances are the cross-validated ones, so a survey whose chi^2 is
    overconfident does not dominate by its pixel count, as it would in a raw stacked
    likelihood (``joint="stacked"``). Their errors correlate (both models learned from one
    training set), so the update uses the correlation measured on held-out stars; per label,
    cross-validation may instead have chosen the Kalman update of independent errors or a
    fixed blend (``Calibration.fusion_methods``).

    ``weighting``: (APOGEE covariance, GALAH covariance) that set the combination's weights when they
    differ from the results' own (the misfit-tempered) covariances
    (:func:`~cannon_bridge.bridge.inference.weighting_covariance`); the joint covariance is then that of
    the combination under the results' covariances.
    """
    calibration = fitted.calibration
    index = fitted.apogee.label_index
    correlation = calibration.fusion_correlation
    labels, covariance = fuse_update(index, from_apogee, from_galah, correlation, weighting)
    methods = calibration.fusion_methods
    if correlation is not None and methods is not None and np.any(np.asarray(methods) == FUSION_KALMAN):
        kalman_labels, kalman_cov = fuse_update(index, from_apogee, from_galah, None, weighting)
        for k in np.flatnonzero(np.asarray(methods) == FUSION_KALMAN):
            labels[:, k] = kalman_labels[:, k]
            rescale_variance(covariance, k, kalman_cov[:, k, k])
    # labels where cross-validation preferred a fixed blend of the two estimates (see calibrate_fusion)
    weights = calibration.fusion_weights
    for k in np.flatnonzero(np.isfinite(weights)) if weights is not None else ():
        w = weights[k]
        labels[:, k] = w * from_apogee.labels[:, k] + (1 - w) * from_galah.labels[:, k]
        rescale_variance(covariance, k, w**2 * from_apogee.covariance[:, k, k]
                          + (1 - w) ** 2 * from_galah.covariance[:, k, k])
    factor = calibration.uncertainty_scale["both"]
    covariance = covariance * factor[None, :, None] * factor[None, None, :]
    chi2 = from_apogee.chi2 + from_galah.chi2
    # each survey's degrees of freedom from its own chi^2 and reduced chi^2 (the total chi^2 divided by each
    # survey's reduced chi^2 overstated them)
    dof_total = from_apogee.chi2 / np.where(from_apogee.reduced_chi2 > 0, from_apogee.reduced_chi2, 1) + \
        from_galah.chi2 / np.where(from_galah.reduced_chi2 > 0, from_galah.reduced_chi2, 1)
    return BridgeInferenceResult(labels, covariance, chi2, chi2 / np.maximum(dof_total, 1),
                                 from_apogee.n_iter + from_galah.n_iter, from_apogee.flags | from_galah.flags,
                                 list(fitted.label_names), chi2_apogee=from_apogee.chi2,
                                 chi2_galah=from_galah.chi2, mode="both",
                                 misfit_factor=np.maximum(from_apogee.misfit_factor, from_galah.misfit_factor)
                                 if from_apogee.misfit_factor is not None and from_galah.misfit_factor is not None
                                 else None)


def fuse_update(apogee_index, from_apogee, from_galah, correlation, weighting=None):
    """(labels, covariance): the GALAH posterior updated by APOGEE's estimate of its labels.

    With ``correlation`` (the measured correlation of both surveys' errors), the correlated
    update of :func:`correlated_update`; without it, or for stars where it fails, the Kalman
    update of independent errors. Stars with no usable covariance keep the GALAH posterior.
    ``weighting`` (APOGEE covariance, GALAH covariance) sets the gain instead of the results' own
    covariances, which then give the covariance of the combination (:func:`combination_covariance`).
    """
    index = apogee_index
    cov_g, cov_a = from_galah.covariance, from_apogee.covariance[:, index[:, None], index[None, :]]
    if weighting is None:
        weight_a, weight_g = cov_a, cov_g
    else:
        weight_a, weight_g = weighting[0][:, index[:, None], index[None, :]], weighting[1]
    usable = np.logical_and.reduce([np.all(np.isfinite(m.reshape(len(m), -1)), axis=1)
                                    for m in (cov_a, cov_g, weight_a, weight_g)])
    labels, covariance = from_galah.labels.copy(), cov_g.copy()
    n_joint = index.size + cov_g.shape[1]
    if correlation is not None and np.shape(correlation) == (n_joint, n_joint) and usable.any():
        rows = np.flatnonzero(usable)
        fused, updated, sane = correlated_update(
            from_galah.labels[rows], weight_g[rows], from_apogee.labels[rows][:, index], weight_a[rows], index,
            correlation, propagate=None if weighting is None else (cov_g[rows], cov_a[rows]))
        labels[rows[sane]], covariance[rows[sane]] = fused[sane], updated[sane]
        usable[rows[sane]] = False
    if usable.any():
        rows = np.flatnonzero(usable)
        g = weight_g[rows]
        innovation = from_apogee.labels[rows][:, index] - from_galah.labels[rows][:, index]
        total = g[:, index[:, None], index[None, :]] + weight_a[rows]
        gain = np.transpose(np.linalg.solve(total, np.transpose(g[:, :, index], (0, 2, 1))), (0, 2, 1))
        fused = from_galah.labels[rows] + np.einsum("skc,sc->sk", gain, innovation)
        if weighting is None:
            updated = g - gain @ g[:, index, :]
            updated = 0.5 * (updated + np.transpose(updated, (0, 2, 1)))
        else:
            updated = combination_covariance(gain, index, cov_g[rows], cov_a[rows])
        # a near-singular single-survey covariance (e.g. every APOGEE pixel masked) can make the
        # update lose positivity: those stars keep the GALAH posterior rather than a NaN uncertainty
        sane = np.all(np.einsum("sii->si", updated) > 0, axis=1) & np.all(np.isfinite(fused), axis=1)
        labels[rows[sane]], covariance[rows[sane]] = fused[sane], updated[sane]
    return labels, covariance


def combination_covariance(gain, index, galah_cov, apogee_cov, cross=None):
    """Covariance of x = g + G (a - g[index]) for GALAH errors of covariance ``galah_cov`` (S, K, K), APOGEE
    errors of ``apogee_cov`` (S, c, c) and Cov(e_g, e_a) = ``cross`` (S, K, c; None: independent).

    x - truth = (I - G P) e_g + G e_a, with P selecting ``index``.
    """
    n_labels = galah_cov.shape[1]
    a = np.broadcast_to(np.eye(n_labels), galah_cov.shape).copy()
    a[:, :, index] -= gain
    gain_t = np.transpose(gain, (0, 2, 1))
    covariance = a @ galah_cov @ np.transpose(a, (0, 2, 1)) + gain @ apogee_cov @ gain_t
    if cross is not None:
        mixed = a @ cross @ gain_t
        covariance += mixed + np.transpose(mixed, (0, 2, 1))
    return 0.5 * (covariance + np.transpose(covariance, (0, 2, 1)))


def calibrate_fusion(fitted: FittedBridge, held, labels, label_errors=None) -> tuple[FusionChoice, list]:
    """Choose, per label, how the joint mode combines the two single-survey estimates.

    Labels both surveys measure use the update with the measured correlation of the two
    surveys' errors (``FusionChoice.correlation``, see :func:`correlated_update`); for the others
    cross-validation picks the Kalman update of independent errors or the best fixed blend
    ``w * apogee + (1 - w) * galah``, whichever has the lower held-out error. The correlation
    used for a fold is measured on the other folds. Reuses the single-survey held-out results ``held[mode]``, lists of (test rows, fold's
    FittedBridge, result). ``label_errors``: the catalogue's errors of ``labels`` (trained through noisy labels), whose
    variance is taken out of the correlation (:func:`error_correlation`). Returns the :class:`FusionChoice` and
    the joint mode's held-out results.
    """
    from .inference import weighting_covariance

    def scaled(result, mode):
        factor = fitted.calibration.uncertainty_scale[mode]
        return replace(result, covariance=result.covariance * factor[None, :, None] * factor[None, None, :])

    pairs = [(test, sub, scaled(ra, "apogee"), scaled(rg, "galah"))
             for (test, sub, ra), (_, _, rg) in zip(held["apogee"], held["galah"])]
    weightings = [(weighting_covariance(fitted, ra), weighting_covariance(fitted, rg)) for _, _, ra, rg in pairs]
    # the correlation of the errors the weights are for (z-scores under each survey's weighting covariance)
    weighted = [(test, sub, replace(ra, covariance=wa), replace(rg, covariance=wg))
                for (test, sub, ra, rg), (wa, wg) in zip(pairs, weightings)]
    n_labels = fitted.n_labels
    index = fitted.apogee.label_index
    out_of_fold = [error_correlation(fitted.label_names, index, [p for j, p in enumerate(weighted) if j != i], labels,
                                     label_errors) for i in range(len(pairs))]
    correlated = np.vstack([fuse_update(index, ra, rg, corr, weighting)[0]
                            for (_, _, ra, rg), corr, weighting in zip(pairs, out_of_fold, weightings)])
    kalman = np.vstack([fuse_update(index, ra, rg, None, weighting)[0]
                        for (_, _, ra, rg), weighting in zip(pairs, weightings)])
    apogee = np.vstack([ra.labels for _, _, ra, _ in pairs])
    galah = np.vstack([rg.labels for _, _, _, rg in pairs])
    truth = np.vstack([labels[test] for test, _, _, _ in pairs])
    weights = np.full(n_labels, np.nan)
    methods = np.full(n_labels, FUSION_CORRELATED, dtype=np.int64)
    # Labels both surveys measure take the correlated update: their errors' correlation
    # (0.6-0.9 on physset) is large and well measured, and ignoring it overweights the worse
    # survey. The other labels (APOGEE knows them only through the population prior) have
    # weak, noisy correlations with APOGEE's errors that add noise there, so CV picks the
    # Kalman update or a fixed blend for them.
    measured = set(int(k) for k in index)
    for k in range(n_labels):
        known = np.isfinite(truth[:, k]) & np.isfinite(apogee[:, k]) & np.isfinite(galah[:, k])
        if known.sum() < 10:
            continue
        a, g, t = apogee[known, k], galah[known, k], truth[known, k]
        spread = np.sum((g - a) ** 2)
        w = float(np.clip(np.sum((g - t) * (g - a)) / spread, 0.0, 1.0)) if spread > 0 else 0.0
        errors = [np.mean((correlated[known, k] - t) ** 2), np.mean((kalman[known, k] - t) ** 2),
                  np.mean((w * a + (1 - w) * g - t) ** 2)]
        if k in measured:
            methods[k] = FUSION_CORRELATED
        else:
            methods[k] = FUSION_KALMAN if errors[1] <= errors[2] else FUSION_BLEND
        if methods[k] == FUSION_BLEND:
            weights[k] = w
        logger.info("joint mode, %s: CV RMS correlated %.4g, Kalman %.4g, blend (w_apogee=%.2f) %.4g -> %s",
                    fitted.label_names[k], *np.sqrt(errors[:2]), w, np.sqrt(errors[2]),
                    ("correlated", "Kalman", "blend")[methods[k]])
    choice = FusionChoice(error_correlation(fitted.label_names, index, weighted, labels, label_errors), methods,
                          weights)
    # each fold fuses with the correlation measured on the other folds
    fused = []
    for (test, sub, ra, rg), corr, weighting in zip(pairs, out_of_fold, weightings):
        sub = replace(sub, calibration=replace(sub.calibration, fusion_correlation=corr,
                                               fusion_methods=methods.copy(), fusion_weights=weights.copy()))
        fused.append((test, sub, fuse(sub, ra, rg, weighting)))
    return choice, fused


def error_correlation(label_names, apogee_index, pairs, labels, errors=None):
    """Correlation matrix of the held-out label errors [APOGEE's labels, GALAH's labels] (z-scores).

    Pairwise over the stars whose reference labels are known, then made positive definite (eigenvalues
    clipped at 0.02, unit diagonal restored). With ``errors`` (the reference labels are catalogue values
    ``y = l + e``, sd ``errors``), both surveys' residuals share each star's ``e``: its variance is taken out
    of the covariance of a label's two estimates and of each one's variance, else the correlation comes out
    near 1 wherever the catalogue's errors are comparable to the spectra's and the joint mode gains nothing
    from the second survey (measured on physset at the issue's errors: 0.79-0.94 against 0.50-0.88 with the
    true labels).
    """
    index = apogee_index
    z = np.vstack([np.hstack([(ra.labels[:, index] - labels[test][:, index]) / ra.uncertainties[:, index],
                              (rg.labels - labels[test]) / rg.uncertainties]) for test, _, ra, rg in pairs])
    # each column's catalogue error in its z units, and the label it refers to
    column_label = np.concatenate([np.asarray(index), np.arange(len(label_names))])
    share = None
    if errors is not None:
        share = np.vstack([np.hstack([errors[test][:, index] / ra.uncertainties[:, index],
                                      errors[test] / rg.uncertainties]) for test, _, ra, rg in pairs])
    n = z.shape[1]
    correlation = np.eye(n)
    for i in range(n):
        for j in range(i):
            both = np.isfinite(z[:, i]) & np.isfinite(z[:, j])
            value = 0.0
            if both.sum() >= 10:
                zi, zj = z[both, i] - z[both, i].mean(), z[both, j] - z[both, j].mean()
                covariance, var_i, var_j = np.mean(zi * zj), np.mean(zi**2), np.mean(zj**2)
                if share is not None:
                    ci, cj = np.nan_to_num(share[both, i]), np.nan_to_num(share[both, j])
                    if column_label[i] == column_label[j]:
                        covariance -= np.mean(ci * cj)
                    # a label's spread cannot fall below a tenth of what it shows (catalogue errors overstated)
                    var_i = max(var_i - np.mean(ci**2), 0.1 * var_i)
                    var_j = max(var_j - np.mean(cj**2), 0.1 * var_j)
                value = covariance / np.sqrt(var_i * var_j) if var_i > 0 and var_j > 0 else 0.0
            correlation[i, j] = correlation[j, i] = float(np.clip(value, -1.0, 1.0)) if np.isfinite(value) else 0.0
    values, vectors = np.linalg.eigh(correlation)
    correlation = (vectors * np.maximum(values, 0.02)) @ vectors.T
    scale = np.sqrt(np.diag(correlation))
    correlation = correlation / scale[:, None] / scale[None, :]
    logger.info("joint mode: correlation of the two surveys' label errors %s",
                {label_names[k]: round(float(correlation[j, index.size + k]), 2) for j, k in enumerate(index)})
    return correlation


def rescale_variance(covariance, k, variance):
    """Give label k the variance ``variance`` (per star), keeping its correlations with the others."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.sqrt(variance / covariance[:, k, k])
    ratio = np.where(np.isfinite(ratio) & (ratio > 0), ratio, 1.0)
    covariance[:, k, :] *= ratio[:, None]
    covariance[:, :, k] *= ratio[:, None]


def correlated_update(galah_labels, galah_cov, apogee_labels, apogee_cov, index, correlation, propagate=None):
    """The GALAH estimate updated by APOGEE's estimate of the labels ``index``, errors correlated.

    Two estimates of the same labels whose errors correlate (both models learned from one training
    set, so they err alike where it is sparse) carry less than two independent ones. ``correlation``
    is the (c + K, c + K) correlation matrix of the errors [APOGEE's c labels, GALAH's K labels],
    measured on held-out stars; with each star's standard deviations D it gives the joint error
    covariance Sigma = D R D. The best linear combination is x = g + L V^-1 (a - g_c), with
    V = Cov(a - g_c) and L = Cov(e_g, e_g,c - e_a), and its covariance is Sigma_gg - L V^-1 L^T.
    With ``propagate`` (GALAH covariance, APOGEE covariance), the covariance returned is that of the same
    combination when the errors have these standard deviations (:func:`combination_covariance`).
    Returns (labels, covariance, sane) where ``sane`` marks stars whose result is usable.
    """
    n_apogee = index.size
    sd = np.sqrt(np.maximum(np.concatenate([np.einsum("sii->si", apogee_cov), np.einsum("sii->si", galah_cov)],
                                           axis=1), 0.0))
    joint = sd[:, :, None] * correlation[None] * sd[:, None, :]
    a_block, g_block = slice(0, n_apogee), slice(n_apogee, None)
    s_aa, s_gg, s_ga = joint[:, a_block, a_block], joint[:, g_block, g_block], joint[:, g_block, a_block]
    left = s_gg[:, :, index] - s_ga  # Cov(e_g, e_g,c - e_a)
    difference = s_gg[:, index[:, None], index[None, :]] + s_aa - s_ga[:, index, :] - np.transpose(s_ga[:, index, :], (0, 2, 1))
    difference = 0.5 * (difference + np.transpose(difference, (0, 2, 1)))
    positive = np.all(np.linalg.eigvalsh(difference) > 0, axis=1)
    difference[~positive] = np.eye(n_apogee)
    gain = np.transpose(np.linalg.solve(difference, np.transpose(left, (0, 2, 1))), (0, 2, 1))  # (S, K, c)
    fused = galah_labels + np.einsum("skc,sc->sk", gain, apogee_labels - galah_labels[:, index])
    if propagate is None:
        updated = s_gg - gain @ np.transpose(left, (0, 2, 1))
        updated = 0.5 * (updated + np.transpose(updated, (0, 2, 1)))
    else:
        sd = np.sqrt(np.maximum(np.concatenate([np.einsum("sii->si", propagate[1]),
                                                np.einsum("sii->si", propagate[0])], axis=1), 0.0))
        joint = sd[:, :, None] * correlation[None] * sd[:, None, :]
        updated = combination_covariance(gain, index, joint[:, g_block, g_block], joint[:, a_block, a_block],
                                         joint[:, g_block, a_block])
    sane = positive & np.all(np.einsum("sii->si", updated) > 0, axis=1) & np.all(np.isfinite(fused), axis=1)
    return fused, updated, sane
