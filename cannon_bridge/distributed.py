"""Training a CannonModel with its pixels split into blocks fitted in parallel on a dask cluster.

Pixels are independent in a Cannon fit, so each block of pixels is fitted on a worker (the labels and
design are shared) and the blocks are joined into one model equal to an in-process fit.
:func:`fit_distributed` is re-exported by :mod:`cannon_bridge.scale`.
"""
from __future__ import annotations

import numpy as np

from ._validation import check_labels, check_spectra
from .errors import InvalidInputError

__all__ = ["fit_distributed"]


_PER_PIXEL = ("coef_", "scatter_", "pixel_flags_", "noise_variance_", "censors_")


def _fit_block(params: dict, flux, labels, ivar, wavelength):
    """Fit a CannonModel on one block of pixels (runs on a worker)."""
    from .model import CannonModel

    return CannonModel(**params).fit(flux, labels, ivar=ivar, wavelength=wavelength)


def fit_distributed(model, flux, labels, ivar=None, wavelength=None, client=None, n_blocks: int | None = None):
    """Train a :class:`~cannon_bridge.model.CannonModel` with its pixels split into blocks fitted in parallel.

    Every pixel's coefficients and scatter are fitted independently of the
    other pixels, so fitting blocks of pixels separately and joining them gives
    the same model as ``model.fit(flux, labels, ivar, wavelength)`` (to
    rounding, ~1e-12). The label scaling and training domain depend on the
    labels alone and are the same in every block.

    Parameters
    ----------
    model : CannonModel
        Its parameters are used; it is fitted in place and returned, as ``fit`` does.
    flux, labels, ivar, wavelength
        As for :meth:`CannonModel.fit`.
    client : None, "local", False, "sync", str, Client or cluster, default None
        As for :func:`predict_files`. False fits the blocks one after another
        in this process (same result, no dask).
    n_blocks : int, optional
        Pixel blocks (tasks). Default: 2 per worker thread (1 block in this process).

    Returns
    -------
    CannonModel
        ``model``, fitted.

    Notes
    -----
    The blocks of ``flux`` and ``ivar`` are copied to the cluster (scattered)
    once each, so the client briefly holds a second copy of them.
    """
    from .model import CannonModel

    if not isinstance(model, CannonModel):
        raise InvalidInputError(
            f"fit_distributed trains a CannonModel; got {type(model).__name__} (a BridgeModel is trained with "
            f"BridgeModel.fit)")
    model._validate_params()
    flux = np.asarray(flux)
    if flux.ndim != 2:
        raise InvalidInputError(f"flux must be 2-D with shape (n_stars, n_pixels); got shape {flux.shape}")
    n_pixels = flux.shape[1]
    if ivar is not None:
        ivar = np.asarray(ivar)
        if ivar.shape != flux.shape:
            raise InvalidInputError(f"flux has shape {flux.shape} but ivar has shape {ivar.shape}")
    if wavelength is not None:
        wavelength = np.asarray(wavelength, dtype=float)
        if wavelength.shape != (n_pixels,):
            raise InvalidInputError(f"wavelength has shape {wavelength.shape}, expected ({n_pixels},)")
    censors = dict(model.censors or {})
    for label, mask in censors.items():
        mask = np.asarray(mask)
        if mask.shape != (n_pixels,) or mask.dtype != bool:
            raise InvalidInputError(f"censors[{label!r}] must be a boolean mask of shape ({n_pixels},); "
                                    f"got dtype {mask.dtype} and shape {mask.shape}")
    if n_blocks is not None and (not isinstance(n_blocks, (int, np.integer)) or isinstance(n_blocks, bool)
                                 or n_blocks < 1):
        raise InvalidInputError(f"n_blocks must be an int >= 1 (pixel blocks); got {n_blocks!r}")

    from ._cluster import open_client  # the cluster connection predict_files shares

    connection, close = open_client(client)
    try:
        if n_blocks is None:
            n_blocks = 1 if connection is None else 2 * max(sum(connection.nthreads().values()), 1)
        bounds = np.linspace(0, n_pixels, min(int(n_blocks), n_pixels) + 1).astype(int)
        blocks = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]

        def block_params(block):
            params = model.get_params()
            params.update(progress=False, censors={k: np.asarray(v)[block] for k, v in censors.items()} or None)
            return params

        def part(array, block):
            return None if array is None else np.ascontiguousarray(array[..., block])

        if connection is None:
            fitted = [_fit_block(block_params(b), part(flux, b), labels, part(ivar, b), part(wavelength, b))
                      for b in blocks]
        else:
            # scatter the data so the task graph stays small (no 'large graph' warnings, no re-sends)
            shipped_labels = connection.scatter(np.asarray(labels), hash=False)
            futures = []
            for b in blocks:
                data = connection.scatter([part(flux, b), part(ivar, b)], hash=False)
                futures.append(connection.submit(_fit_block, block_params(b), data[0], shipped_labels,
                                                 data[1], part(wavelength, b), pure=False))
            fitted = connection.gather(futures)
            del futures, shipped_labels
    finally:
        close()
    model = _join_blocks(model, fitted, wavelength)
    # the coefficients' covariance shares each star's weight over every pixel: estimated once, as fit does
    checked_flux, checked_ivar = check_spectra(flux, ivar, copy=False)
    model._set_coefficient_noise(checked_flux, checked_ivar, check_labels(labels, n_stars=flux.shape[0]))
    return model


def _join_blocks(model, fitted, wavelength):
    first = fitted[0]
    for name, value in vars(first).items():
        if (name.endswith("_") and not name.startswith("__")) and name not in _PER_PIXEL:
            setattr(model, name, value)
    for name in _PER_PIXEL:
        setattr(model, name, np.concatenate([getattr(part, name) for part in fitted], axis=0))
    model.n_features_in_ = int(model.coef_.shape[0])
    model.wavelength_ = None if wavelength is None else np.asarray(wavelength, dtype=float).copy()
    return model
