"""The backend interface: every kernel a backend provides, in one frozen dataclass.

:func:`cannon_bridge.backends.get_backend` returns a :class:`Backend`. Its kernel fields are declared
with :func:`_kernel`, which records whether the kernel is required and which function of
:mod:`cannon_bridge.backends._numpy` is its reference (the registry :data:`KERNELS`, built from the
fields). Every implementation is tested against its reference. Optional kernels are ``None`` where an
implementation has none: callers test ``backend.fit_fused is not None`` (no ``hasattr``). The numpy
backend itself leaves every optional kernel ``None`` (its training runs the generic array code the
optional kernels fuse); their references in ``_numpy`` state what a fused kernel must compute.

The (9,) result of ``spectra_summary`` is indexed by the ``SUMMARY_*`` constants defined here.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Optional

__all__ = ["Backend", "KernelSpec", "KERNELS", "N_SUMMARY", "SUMMARY_NAN_IVAR", "SUMMARY_INF_IVAR",
           "SUMMARY_NEGATIVE_IVAR", "SUMMARY_BAD_USED_FLUX", "SUMMARY_NONFINITE_FLUX", "SUMMARY_MAX_ABS_USED_FLUX",
           "SUMMARY_MAX_ABS_FLUX", "SUMMARY_MAX_IVAR", "SUMMARY_MIN_POSITIVE_IVAR"]

#: length of ``spectra_summary``'s result, and the index of each of its entries
N_SUMMARY = 9
(SUMMARY_NAN_IVAR, SUMMARY_INF_IVAR, SUMMARY_NEGATIVE_IVAR, SUMMARY_BAD_USED_FLUX, SUMMARY_NONFINITE_FLUX,
 SUMMARY_MAX_ABS_USED_FLUX, SUMMARY_MAX_ABS_FLUX, SUMMARY_MAX_IVAR, SUMMARY_MIN_POSITIVE_IVAR) = range(N_SUMMARY)


@dataclass(frozen=True)
class KernelSpec:
    """One kernel of the interface: its field name, whether every backend has it, its numpy reference
    (a function of :mod:`cannon_bridge.backends._numpy`) and its contract."""

    name: str
    required: bool
    reference: str
    doc: str


def _kernel(doc: str, required: bool = True, reference: Optional[str] = None):
    """A kernel field: required (no default) or optional (default None); ``reference`` defaults to the field's
    name in ``backends._numpy``."""
    metadata = {"kernel": True, "required": required, "reference": reference, "doc": " ".join(doc.split())}
    return field(metadata=metadata) if required else field(default=None, metadata=metadata)


def _plain(doc: str, default: Any = MISSING):
    return field(default=default, metadata={"doc": " ".join(doc.split())})


@dataclass(frozen=True)
class Backend:
    """The kernels of one backend (see :data:`KERNELS` for each kernel's contract and numpy reference)."""

    name: str = _plain("'numpy', 'numba' or 'cupy' (or the name given to ``array_module_backend``).")
    xp: Any = _plain("The array module of the kernels' arrays and of the batched test step (numpy or cupy).")
    to_device: Callable = _plain("""Move a host block to ``xp`` (float blocks become float64: the kernels
        accumulate in float64).""")
    to_host: Callable = _plain("Move an ``xp`` array back to numpy (the identity on the CPU).")

    # ------------------------------------------------------------ required kernels
    solve_normal_equations: Callable = _kernel("""
        ``(design, weights, flux, active=None, diagonal=None, products=None, normal=None) -> (coef, ok)``:
        per-pixel weighted least squares for one block of pixels. ``design`` (n_stars, n_terms),
        ``weights`` and ``flux`` (n_stars, n_pixels); ``active`` (n_pixels, n_terms) the terms a pixel may
        use (censored terms get exactly 0); ``diagonal`` (n_pixels, n_terms) added to each normal matrix
        (ridge / reweighted L1); ``products`` the packed Z of the design when the caller built it;
        ``normal`` the pair (packed W^T Z, (W F)^T A) when the caller solves one system with several
        diagonals. coef (n_pixels, n_terms), ok (n_pixels,) bool; a pixel not ok has coefficients 0.""")
    fit_scatter: Callable = _kernel("""
        ``(residuals, data_variance, observed, dof_factor=1.0, n_iter=40, pixel_major=False) -> s2``:
        the per-pixel intrinsic variance maximising the marginal likelihood (arrays (n_stars, n_pixels),
        or (n_pixels, n_stars) with ``pixel_major``).""")
    median_snr: Callable = _kernel("""
        ``(flux, ivar, used) -> (n_stars,)``: median over the ``used`` pixels of |flux| sqrt(ivar), per
        star; 0 for a star without a used pixel (the test step's LOW_SNR flag).""")
    inverse_sums: Callable = _kernel("""
        ``(ivar, total, count) -> None``: add each column's sum of 1/ivar over the rows with ivar > 0 to
        ``total`` (float64) and their number to ``count`` (int64), in place; ``ivar`` any 2-D float array
        or view (the per-pixel noise variance).""")
    gather_weighted: Callable = _kernel("""
        ``(flux, ivar, rows, columns, scatter_variance) -> (weights, flux, n_used)``: the test step's
        float64 (n_rows, n_columns) weights ``effective_weights(ivar, s2)`` (``scatter_variance`` given per
        column) and flux of ``rows`` x ``columns``, and each row's number of positive weights.""")
    band_limited_block: Callable = _kernel("""
        ``(flux, ivar, rows, columns, filter_index, taps, dtype) -> (flux, ivar)``: the band-limited
        (``bandlimit.band_limit``) flux and ivar of ``rows`` x ``columns`` in ``dtype``, with the plan
        ``(filter_index, taps)`` of ``bandlimit.band_limit_plan``: a pixel is filtered where every pixel
        its filter reaches is used (0 < ivar < inf, finite flux) and keeps its values elsewhere.""")
    spectra_summary: Callable = _kernel("""
        ``(flux, ivar=None) -> (9,) float64``: counts of NaN, +inf and negative ivar, of non-finite flux
        where 0 < ivar < inf and anywhere; the largest |flux| where 0 < ivar < inf and over all finite
        flux; the largest such ivar and the smallest (inf when none). Indexed by the SUMMARY_* constants
        (the input checks' one-read path).""")
    clear_caches: Callable = _kernel("""
        ``() -> None``: drop what the kernels keep between the calls of one fit (numba: the design
        products); called when a fit ends.""")

    # ------------------------------------------------------------ optional kernels (None: not provided)
    prepare_block: Optional[Callable] = _kernel("""
        ``(flux, ivar=None, star_mask=None) -> (flux, weights, observed, flux_t, variance_t, observed_t,
        counts)``: a training block's elementwise work in one pass: float64 flux (0 where unused), weights
        (ivar, 0 where unused), the observed mask, their pixel-major copies for the scatter fit and the
        per-pixel counts.""", required=False)
    reweight: Optional[Callable] = _kernel("""
        ``(ivar, observed, scatter_variance, out) -> out``: ``effective_weights`` where observed, 0
        elsewhere, written into ``out``.""", required=False)
    solve_reweighted: Optional[Callable] = _kernel("""
        ``(design, weights, flux, active, regularization=0.0, n_reweight=6, products=None) -> (coef,
        ok)``: one solve, then (regularization > 0) ``n_reweight`` reweighted-L1 solves with the diagonal
        regularization / (2 max(|coef|, 1e-6)) (none on term 0), on the same normal matrices. Comes with
        ``training_products``.""", required=False)
    training_products: Optional[Callable] = _kernel("""
        ``(design) -> products``: what ``solve_reweighted`` needs of the design, built once per fit (in
        the backend's own form: numpy the packed Z, numba the distinct products and their map).""",
        required=False)
    lm_projected: Optional[Callable] = _kernel("""
        ``(x0, star_of, gram, rhs, flux_norm, exponents, max_iter=100, tol=1e-9, atol=1e-4, bound=10.0,
        clip=True) -> (x, chi2, hessian, converged, n_iter)``: ``inference.levenberg_marquardt`` on one
        projected block over every label and no prior, start ``s`` on the statistics of star ``star_of[s]``
        (``clip``: chi^2 clipped at 0; False for the debiased chi^2).""",
        required=False)
    fit_fused: Optional[Callable] = _kernel("""
        ``(flux, ivar, star_mask, design, active, n_passes, dof_factor, n_iter=40, tile=None,
        star_chunk=None, regularization=0.0, n_reweight=6) -> (coef, ok, s2, counts, total_variance,
        passes_done)``: every training pass of a block of pixels (solve, scatter, reweighting; a pixel
        whose scatter repeats stops), for at most ``fused_max_terms`` terms.""", required=False)
    fused_max_terms: int = _plain("The most terms ``fit_fused`` is used for (0 without ``fit_fused``).", 0)

    def __post_init__(self):
        for spec in KERNELS.values():
            value = getattr(self, spec.name)
            if value is None and spec.required:
                raise TypeError(f"backend {self.name!r}: the required kernel {spec.name!r} is None")
            if value is not None and not callable(value):
                raise TypeError(f"backend {self.name!r}: kernel {spec.name!r} is not callable")


#: every kernel of :class:`Backend`, by field name, with its numpy reference (``backends._numpy.<reference>``)
KERNELS: dict[str, KernelSpec] = {
    item.name: KernelSpec(item.name, item.metadata["required"], item.metadata["reference"] or item.name,
                          item.metadata["doc"])
    for item in fields(Backend) if item.metadata.get("kernel")
}


def _document() -> str:
    lines = [Backend.__doc__, "", "Fields", "------"]
    for item in fields(Backend):
        spec = KERNELS.get(item.name)
        if spec is None:
            lines += [f"{item.name}", f"    {item.metadata['doc']}"]
        else:
            kind = "required" if spec.required else "optional, None when not provided"
            lines += [f"{item.name} : kernel, {kind}; numpy reference ``_numpy.{spec.reference}``",
                      f"    {spec.doc}"]
    return "\n".join(lines)


Backend.__doc__ = _document()
