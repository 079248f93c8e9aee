"""Figures (matplotlib, saved as PNG). Functions take arrays, never models."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["one_to_one", "spectrum_comparison", "window_rms_bars", "zscore_histograms"]


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*args, **kwargs)


def one_to_one(truth: np.ndarray, inferred: np.ndarray, label_names: Sequence[str], path, title: str = "",
               uncertainties: np.ndarray | None = None) -> Path:
    """A panel per label: inferred vs true, with bias and RMS written in."""
    n = len(label_names)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    plt, (fig, axes) = _figure(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
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
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def spectrum_comparison(wavelength: np.ndarray, observed: np.ndarray, regenerated: np.ndarray,
                        variance: np.ndarray | None, windows: dict, path, ranges: Sequence[tuple] = (),
                        title: str = "") -> Path:
    """Observed vs regenerated spectrum with line windows shaded and a residual panel, one column per range."""
    ranges = list(ranges) or [(wavelength.min(), wavelength.max())]
    plt, (fig, axes) = _figure(2, len(ranges), figsize=(4.2 * len(ranges), 4.6), squeeze=False,
                               gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
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
                             transform=top.get_xaxis_transform())
        bottom.axhline(0, color="0.5", lw=0.5)
        bottom.set_xlabel("wavelength (air, Å)")
        if c == 0:
            top.set_ylabel("normalised flux")
            bottom.set_ylabel("obs − regen")
            top.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def window_rms_bars(groups: Sequence[str], values: dict, path, ylabel: str = "RMS", title: str = "") -> Path:
    """Grouped bars: one group per element/window set, one bar per method in ``values``."""
    plt, (fig, ax) = _figure(figsize=(1.0 + 0.9 * len(groups), 3.6))
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(groups))
    for i, (method, numbers) in enumerate(values.items()):
        ax.bar(x + i * width, numbers, width, label=method)
    ax.set_xticks(x + 0.4 - width / 2, groups)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def zscore_histograms(z: np.ndarray, label_names: Sequence[str], path, title: str = "") -> Path:
    """Histogram of (inferred − true)/sigma per label with the unit normal overlaid."""
    n = len(label_names)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    plt, (fig, axes) = _figure(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
    grid = np.linspace(-4, 4, 200)
    for k, name in enumerate(label_names):
        ax = axes.flat[k]
        values = z[:, k][np.isfinite(z[:, k])]
        ax.hist(np.clip(values, -4, 4), bins=30, range=(-4, 4), density=True, color="C0", alpha=0.7)
        ax.plot(grid, np.exp(-0.5 * grid**2) / np.sqrt(2 * np.pi), "k-", lw=0.8)
        ax.set_title(f"{name}: std {np.std(values):.2f}", fontsize=9)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
