"""Figures (matplotlib, drawn with Agg, saved as PNG). Functions take arrays and Tables, never models.

Every function writes one PNG and returns its Path; bad input (mismatched
shapes, unknown columns, a path that is not ``.png``) raises
:class:`cannon_bridge.errors.InvalidInputError` before anything is drawn.

Figures are built with matplotlib's object-oriented API (a
:class:`matplotlib.figure.Figure` on its own Agg canvas), never through
``pyplot``: calling these functions neither switches matplotlib's backend nor
leaves figures open in pyplot's registry.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InvalidInputError

__all__ = ["one_to_one", "spectrum_comparison", "window_rms_bars", "zscore_histograms", "residual_vs_label",
           "coefficients_vs_wavelength", "line_residual_map"]


def _png_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidInputError(f"path must name a .png file; got {str(path)!r}")
    if not path.parent.is_dir():
        raise InvalidInputError(f"the folder of {str(path)!r} does not exist: create it first")
    return path


def _label_arrays(truth, inferred, label_names) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(truth, dtype=float)
    inferred = np.asarray(inferred, dtype=float)
    if truth.ndim == 1:
        truth, inferred = truth[:, None], inferred.reshape(-1, 1) if inferred.ndim == 1 else inferred
    if truth.ndim != 2 or truth.shape != inferred.shape:
        raise InvalidInputError(f"truth has shape {truth.shape} but inferred has shape {inferred.shape}: "
                                "both must be (n_stars, n_labels)")
    if truth.shape[1] != len(label_names):
        raise InvalidInputError(f"label_names has {len(label_names)} names but the labels have "
                                f"{truth.shape[1]} columns")
    if truth.shape[0] == 0:
        raise InvalidInputError("no stars to plot: truth and inferred are empty")
    return truth, inferred


def _figure(nrows: int = 1, ncols: int = 1, *, figsize=None, **subplots_kwargs):
    """A new Figure on its own Agg canvas and its axes, as ``pyplot.subplots`` returns them, without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **subplots_kwargs)


def _colours() -> list:
    """The colours of the current ``axes.prop_cycle`` (C0, C1, ...)."""
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def _save(fig, path, title: str = "", unused_axes=()) -> Path:
    """Hide the unused panels, add the title and write the PNG (the Figure is freed with its last reference)."""
    for ax in unused_axes:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def one_to_one(truth: np.ndarray, inferred: np.ndarray, label_names: Sequence[str], path, title: str = "",
               uncertainties: np.ndarray | None = None) -> Path:
    """A panel per label: inferred vs true, with bias and RMS written in."""
    path = _png_path(path)
    truth, inferred = _label_arrays(truth, inferred, label_names)
    n = len(label_names)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = _figure(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for k, name in enumerate(label_names):
        ax = axes.flat[k]
        good = np.isfinite(truth[:, k]) & np.isfinite(inferred[:, k])
        t, p = truth[good, k], inferred[good, k]
        if uncertainties is not None:
            ax.errorbar(t, p, yerr=uncertainties[good, k], fmt="none", ecolor="0.7", lw=0.5, zorder=1)
        ax.scatter(t, p, s=6, zorder=2)
        lo, hi = np.nanmin(np.r_[t, p]), np.nanmax(np.r_[t, p])
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        bias, rms = np.mean(p - t), np.sqrt(np.mean((p - t) ** 2))
        ax.set_title(f"{name}\nbias {bias:+.3g}  rms {rms:.3g}", fontsize=9)
        ax.set_xlabel("true")
        ax.set_ylabel("inferred")
    return _save(fig, path, title, axes.flat[n:])


def spectrum_comparison(wavelength: np.ndarray, observed: np.ndarray, regenerated: np.ndarray,
                        variance: np.ndarray | None, windows: dict, path, ranges: Sequence[tuple] = (),
                        title: str = "") -> Path:
    """Observed vs regenerated spectrum with line windows shaded and a residual panel, one column per range.

    ``windows`` is ``{element: [(start, end), ...]}`` or a line Table with ``element``,
    ``window_start`` and ``window_end`` (:func:`cannon_bridge.lines.line_table`, or the
    Table of :func:`cannon_bridge.lines.line_metrics`, whose flagged lines get a red label).
    """
    path = _png_path(path)
    wavelength = np.asarray(wavelength, dtype=float)
    observed, regenerated = np.asarray(observed, dtype=float), np.asarray(regenerated, dtype=float)
    for name, array in (("observed", observed), ("regenerated", regenerated)) + (
            (("variance", np.asarray(variance, dtype=float)),) if variance is not None else ()):
        if array.shape != wavelength.shape or wavelength.ndim != 1:
            raise InvalidInputError(f"{name} has shape {array.shape} but wavelength has {wavelength.shape}: "
                                    "pass one spectrum (n_pixels,) on the wavelength grid")
    flagged = set()
    if hasattr(windows, "colnames"):
        table = windows
        missing = [c for c in ("element", "window_start", "window_end") if c not in table.colnames]
        if missing:
            raise InvalidInputError(f"windows lacks the column(s) {missing}; pass a dict or a line Table")
        windows = {}
        for row in table:
            windows.setdefault(str(row["element"]), []).append((float(row["window_start"]), float(row["window_end"])))
            if "flags" in table.colnames and row["flags"]:
                flagged.add((float(row["window_start"]), float(row["window_end"])))
    elif not isinstance(windows, dict):
        raise InvalidInputError(f"windows must be a dict {{element: [(start, end)]}} or a line Table; got "
                                f"{type(windows).__name__}")
    ranges = list(ranges) or [(wavelength.min(), wavelength.max())]
    fig, axes = _figure(2, len(ranges), figsize=(4.2 * len(ranges), 4.6), squeeze=False,
                               gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    colours = _colours()
    for c, (lo, hi) in enumerate(ranges):
        sel = (wavelength >= lo) & (wavelength <= hi)
        top, bottom = axes[0, c], axes[1, c]
        top.plot(wavelength[sel], observed[sel], color="k", lw=0.7, label="observed")
        top.plot(wavelength[sel], regenerated[sel], color="C3", lw=0.9, label="regenerated from APOGEE")
        if variance is not None:
            sd = np.sqrt(variance[sel])
            top.fill_between(wavelength[sel], regenerated[sel] - sd, regenerated[sel] + sd, color="C3", alpha=0.25, lw=0)
        bottom.plot(wavelength[sel], observed[sel] - regenerated[sel], color="k", lw=0.6)
        for i, (element, spans) in enumerate(windows.items()):
            for start, end in spans:
                if end >= lo and start <= hi:
                    for ax in (top, bottom):
                        ax.axvspan(start, end, color=colours[i % len(colours)], alpha=0.2, lw=0)
                    top.text(0.5 * (start + end), 1.02, element, ha="center", fontsize=7,
                             color="red" if (float(start), float(end)) in flagged else "black",
                             transform=top.get_xaxis_transform())
        bottom.axhline(0, color="0.5", lw=0.5)
        bottom.set_xlabel("wavelength (air, Å)")
        if c == 0:
            top.set_ylabel("normalised flux")
            bottom.set_ylabel("obs − regen")
            top.legend(fontsize=7, loc="lower left")
    return _save(fig, path, title)


def window_rms_bars(groups: Sequence[str], values: dict, path, ylabel: str = "RMS", title: str = "") -> Path:
    """Grouped bars: one group per element/window set, one bar per method in ``values``."""
    path = _png_path(path)
    for method, numbers in values.items():
        if len(numbers) != len(groups):
            raise InvalidInputError(f"values[{method!r}] has {len(numbers)} numbers for {len(groups)} groups")
    fig, ax = _figure(figsize=(1.0 + 0.9 * len(groups), 3.6))
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(groups))
    for i, (method, numbers) in enumerate(values.items()):
        ax.bar(x + i * width, numbers, width, label=method)
    ax.set_xticks(x + 0.4 - width / 2, groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def zscore_histograms(z: np.ndarray, label_names: Sequence[str], path, title: str = "") -> Path:
    """Histogram of (inferred − true)/sigma per label with the unit normal overlaid."""
    path = _png_path(path)
    z = np.asarray(z, dtype=float)
    if z.ndim != 2 or z.shape[1] != len(label_names):
        raise InvalidInputError(f"z must have shape (n_stars, {len(label_names)}); got {z.shape}")
    n = len(label_names)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = _figure(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
    grid = np.linspace(-4, 4, 200)
    for k, name in enumerate(label_names):
        ax = axes.flat[k]
        values = z[:, k][np.isfinite(z[:, k])]
        ax.hist(np.clip(values, -4, 4), bins=30, range=(-4, 4), density=True, color="C0", alpha=0.7)
        ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), "k-", lw=0.8)
        ax.set_title(f"{name}: std {np.std(values):.2f}", fontsize=9)
    return _save(fig, path, title, axes.flat[n:])


def residual_vs_label(truth, inferred, label_names: Sequence[str], path, against: str | np.ndarray | None = None,
                      title: str = "") -> Path:
    """A panel per label: inferred − true against the true label (or against one label for all panels).

    ``against`` is a label name (its true values on every x axis, e.g. ``"teff"``),
    an array of shape (n_stars,) (e.g. S/N), or None (each label against itself).
    A running median (10 bins) shows trends.
    """
    path = _png_path(path)
    label_names = [str(name) for name in label_names]
    truth, inferred = _label_arrays(truth, inferred, label_names)
    x_name = None
    if isinstance(against, str):
        if against not in label_names:
            raise InvalidInputError(f"against={against!r} is not one of label_names {label_names}")
        x_name, x_all = against, truth[:, label_names.index(against)]
    elif against is not None:
        x_all = np.asarray(against, dtype=float)
        if x_all.shape != (truth.shape[0],):
            raise InvalidInputError(f"against must be a label name or an array of shape ({truth.shape[0]},); "
                                    f"got shape {x_all.shape}")
        x_name = "value"
    n = len(label_names)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = _figure(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for k, name in enumerate(label_names):
        ax = axes.flat[k]
        x = truth[:, k] if against is None else x_all
        delta = inferred[:, k] - truth[:, k]
        good = np.isfinite(x) & np.isfinite(delta)
        ax.scatter(x[good], delta[good], s=5, alpha=0.6)
        ax.axhline(0, color="k", lw=0.7)
        if good.sum() >= 20:
            edges = np.quantile(x[good], np.linspace(0, 1, 11))
            centre, median = [], []
            for lo, hi in zip(edges[:-1], edges[1:]):
                inside = good & (x >= lo) & (x <= hi)
                if inside.any():
                    centre.append(np.median(x[inside]))
                    median.append(np.median(delta[inside]))
            ax.plot(centre, median, color="C3", lw=1.2)
        ax.set_xlabel(f"true {name}" if x_name is None else x_name)
        ax.set_ylabel(f"Δ {name}")
        ax.set_title(name, fontsize=9)
    return _save(fig, path, title, axes.flat[n:])


def coefficients_vs_wavelength(wavelength, coefficients, term_names: Sequence[str], path, lines=None,
                               ranges: Sequence[tuple] = (), title: str = "", max_terms: int = 8) -> Path:
    """One row per model term: its coefficient against wavelength, with line positions marked.

    ``coefficients`` is (n_pixels, n_terms) (e.g. the linear terms of a Cannon's
    ``coef_``); ``lines`` a Table with ``wavelength`` and ``element`` or a dict
    ``{element: [wavelength]}``; ``ranges`` zooms (one column each); at most
    ``max_terms`` terms are drawn.
    """
    path = _png_path(path)
    wavelength = np.asarray(wavelength, dtype=float)
    coefficients = np.asarray(coefficients, dtype=float)
    if coefficients.ndim == 1:
        coefficients = coefficients[:, None]
    if wavelength.ndim != 1 or coefficients.ndim != 2 or coefficients.shape[0] != wavelength.size:
        raise InvalidInputError(f"coefficients must have shape (n_pixels, n_terms) with n_pixels = {wavelength.size} "
                                f"(the wavelength grid); got {coefficients.shape}")
    if len(term_names) != coefficients.shape[1]:
        raise InvalidInputError(f"term_names has {len(term_names)} names for {coefficients.shape[1]} "
                                "coefficient columns")
    markers = []
    if lines is not None:
        if isinstance(lines, dict):
            markers = [(float(w), str(e)) for e, ws in lines.items() for w in np.atleast_1d(ws)]
        elif hasattr(lines, "colnames") and {"wavelength", "element"} <= set(lines.colnames):
            markers = [(float(w), str(e)) for w, e in zip(lines["wavelength"], lines["element"])]
        else:
            raise InvalidInputError("lines must be a dict {element: [wavelength]} or a Table with "
                                    "'wavelength' and 'element' columns")
    n_terms = min(coefficients.shape[1], max_terms)
    ranges = list(ranges) or [(wavelength.min(), wavelength.max())]
    fig, axes = _figure(n_terms, len(ranges), figsize=(4.2 * len(ranges), 1.5 + 1.3 * n_terms),
                               squeeze=False, sharex="col")
    colours = _colours()
    elements = list(dict.fromkeys(e for _, e in markers))
    for c, (lo, hi) in enumerate(ranges):
        sel = (wavelength >= lo) & (wavelength <= hi)
        for t in range(n_terms):
            ax = axes[t, c]
            ax.plot(wavelength[sel], coefficients[sel, t], color="k", lw=0.6)
            ax.axhline(0, color="0.6", lw=0.5)
            for w, element in markers:
                if lo <= w <= hi:
                    ax.axvline(w, color=colours[elements.index(element) % len(colours)], lw=0.8, alpha=0.7)
                    if t == 0:
                        ax.text(w, 1.02, element, ha="center", fontsize=7, transform=ax.get_xaxis_transform())
            if c == 0:
                ax.set_ylabel(term_names[t], fontsize=8)
        axes[-1, c].set_xlabel("wavelength (Å)")
    return _save(fig, path, title)


def line_residual_map(table, path, column: str = "depth_residual", title: str = "", sort_by=None) -> Path:
    """Per-line residuals grouped by element.

    With a ``<column>_per_star`` column (``line_metrics(..., per_star=True)``) an
    image: one column per line (ordered by element, then wavelength), one row per
    star (ordered by ``sort_by``, an array of shape (n_stars,), when given).
    Otherwise the per-line means with the scatter over stars (from ``<column>_rms``
    when present), coloured by element. Flagged lines get a red x above the panel.
    """
    path = _png_path(path)
    if not hasattr(table, "colnames"):
        raise InvalidInputError(f"table must be an astropy Table from line_metrics; got {type(table).__name__}")
    missing = [c for c in ("element", "wavelength", column) if c not in table.colnames]
    if missing:
        raise InvalidInputError(f"table lacks the column(s) {missing}; columns are {table.colnames}")
    if len(table) == 0:
        raise InvalidInputError("table has no lines to plot")
    order = np.lexsort((np.asarray(table["wavelength"], float), np.asarray(table["element"]).astype(str)))
    elements = np.asarray(table["element"]).astype(str)[order]
    names = [f"{e}{w:.0f}" for e, w in zip(elements, np.asarray(table["wavelength"], float)[order])]
    per_star = f"{column}_per_star"
    flagged = np.asarray(table["flags"])[order] != 0 if "flags" in table.colnames else np.zeros(len(order), bool)
    fig, ax = _figure(figsize=(2.0 + 0.32 * len(order), 4.2))
    x = np.arange(len(order))
    if per_star in table.colnames and np.ndim(table[per_star]) == 2:
        image = np.asarray(table[per_star], dtype=float)[order].T  # (n_stars, n_lines)
        if sort_by is not None:
            sort_by = np.asarray(sort_by)
            if sort_by.shape != (image.shape[0],):
                raise InvalidInputError(f"sort_by must have shape ({image.shape[0]},), one value per star")
            image = image[np.argsort(sort_by)]
        limit = np.nanpercentile(np.abs(image), 98) if np.isfinite(image).any() else 1.0
        shown = ax.imshow(image, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest",
                          extent=(-0.5, len(order) - 0.5, image.shape[0] - 0.5, -0.5))
        fig.colorbar(shown, ax=ax, label=column)
        ax.set_ylabel("star" + (" (sorted)" if sort_by is not None else ""))
    else:
        values = np.asarray(table[column], dtype=float)[order]
        errors = None
        if f"{column}_rms" in table.colnames:  # the scatter over stars: sqrt(rms^2 - mean^2)
            rms = np.asarray(table[f"{column}_rms"], dtype=float)[order]
            errors = np.sqrt(np.maximum(rms**2 - values**2, 0.0))
        colours = _colours()
        unique = list(dict.fromkeys(elements))
        for i, element in enumerate(unique):
            pick = elements == element
            ax.errorbar(x[pick], values[pick], yerr=None if errors is None else errors[pick], fmt="o", ms=4,
                        color=colours[i % len(colours)], label=element)
        ax.axhline(0, color="k", lw=0.7)
        ax.set_ylabel(column)
        ax.legend(fontsize=7, ncol=min(len(unique), 6))
    if flagged.any():  # above the panel, where they hide no data
        ax.plot(x[flagged], np.full(flagged.sum(), 1.03), "x", color="red", ms=7, mew=2, clip_on=False,
                transform=ax.get_xaxis_transform())
    for boundary in np.flatnonzero(elements[1:] != elements[:-1]):
        ax.axvline(boundary + 0.5, color="0.3", lw=0.8)
    ax.set_xticks(x, names, rotation=90, fontsize=7)
    if title:
        ax.set_title(title)
    return _save(fig, path)
