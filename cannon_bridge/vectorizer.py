"""Label vectorizer: label scaling, polynomial terms, design matrix and its Jacobian.

The Cannon writes every pixel's flux as ``a(x) . theta`` where ``x`` are the
scaled labels ``(label - pivot) / scale`` and ``a`` are monomials of ``x``.
The monomials are described by an integer exponent matrix ``term_exponents``
of shape ``(n_terms, n_labels)``: column ``j`` of the design matrix is
``prod_i x_i ** term_exponents[j, i]``. This is the layout AnniesLasso and the
original Cannon code use, so models trained there can be imported exactly.
"""
from __future__ import annotations

from itertools import combinations_with_replacement
from typing import Sequence

import numpy as np

from .backends.polynomial import monomial_jacobian, monomials
from .errors import InvalidInputError

__all__ = ["PolynomialVectorizer", "polynomial_exponents", "term_name"]


def polynomial_exponents(n_labels: int, order: int) -> np.ndarray:
    """Exponents of every monomial of total degree <= ``order``.

    Terms are ordered by degree (constant, linear, quadratic, ...), and within a
    degree in the order of ``itertools.combinations_with_replacement``.

    Returns
    -------
    ndarray of shape (n_terms, n_labels), int
    """
    rows = [np.zeros(n_labels, dtype=np.int64)]
    for degree in range(1, order + 1):
        for combo in combinations_with_replacement(range(n_labels), degree):
            row = np.zeros(n_labels, dtype=np.int64)
            for index in combo:
                row[index] += 1
            rows.append(row)
    return np.array(rows, dtype=np.int64)


def term_name(exponents: np.ndarray, label_names: Sequence[str]) -> str:
    """Human-readable name of one term: ``"1"``, ``"teff"``, ``"teff^2"``, ``"teff*logg"``."""
    parts = []
    for name, power in zip(label_names, exponents):
        if power == 1:
            parts.append(str(name))
        elif power > 1:
            parts.append(f"{name}^{int(power)}")
    return "*".join(parts) if parts else "1"


class PolynomialVectorizer:
    """Maps labels to the Cannon design matrix.

    Parameters
    ----------
    label_names : sequence of str
    order : int, default 2
        Total polynomial degree; ignored when ``term_exponents`` is given.
    pivots, scales : array-like of shape (n_labels,), optional
        Scaling ``x = (label - pivot) / scale``. Learn them with :meth:`fit`.
    term_exponents : array-like of shape (n_terms, n_labels), optional
        Explicit monomials (e.g. imported from another Cannon code).

    Examples
    --------
    >>> import numpy as np
    >>> v = PolynomialVectorizer(["teff", "logg"], order=2)
    >>> v.term_names
    ['1', 'teff', 'logg', 'teff^2', 'teff*logg', 'logg^2']
    >>> v = v.fit(np.array([[4000.0, 1.0], [5000.0, 3.0], [6000.0, 5.0]]))
    >>> v.design_matrix(np.array([[5000.0, 3.0]])).round(6).tolist()
    [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    """

    def __init__(
        self,
        label_names: Sequence[str],
        order: int = 2,
        pivots: Sequence[float] | None = None,
        scales: Sequence[float] | None = None,
        term_exponents: np.ndarray | None = None,
    ) -> None:
        self.label_names = [str(name) for name in label_names]
        if len(set(self.label_names)) != len(self.label_names):
            raise InvalidInputError(f"label_names must be unique; got {self.label_names}")
        n_labels = len(self.label_names)
        if n_labels == 0:
            raise InvalidInputError("label_names must name at least one label")
        if term_exponents is None:
            if not (isinstance(order, (int, np.integer)) and order >= 1):
                raise InvalidInputError(f"order must be an int >= 1; got {order!r}")
            term_exponents = polynomial_exponents(n_labels, int(order))
        term_exponents = np.asarray(term_exponents, dtype=np.int64)
        if term_exponents.ndim != 2 or term_exponents.shape[1] != n_labels:
            raise InvalidInputError(
                f"term_exponents must have shape (n_terms, {n_labels}); got {term_exponents.shape}"
            )
        if np.any(term_exponents < 0):
            raise InvalidInputError("term_exponents must be non-negative")
        self.term_exponents = term_exponents
        self.order = int(term_exponents.sum(axis=1).max())
        self.pivots = None if pivots is None else np.asarray(pivots, dtype=float).copy()
        self.scales = None if scales is None else np.asarray(scales, dtype=float).copy()
        for name, value in (("pivots", self.pivots), ("scales", self.scales)):
            if value is not None and value.shape != (n_labels,):
                raise InvalidInputError(f"{name} must have shape ({n_labels},); got {value.shape}")
        if self.scales is not None and np.any(~np.isfinite(self.scales) | (self.scales == 0)):
            raise InvalidInputError(f"scales must be finite and non-zero; got {self.scales}")

    # ------------------------------------------------------------------ basics
    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_terms(self) -> int:
        return self.term_exponents.shape[0]

    @property
    def term_names(self) -> list[str]:
        return [term_name(row, self.label_names) for row in self.term_exponents]

    def terms_involving(self, label: str) -> np.ndarray:
        """Boolean mask over terms: True where the term contains ``label``."""
        index = self.label_names.index(label)
        return self.term_exponents[:, index] > 0

    @property
    def linear_terms(self) -> np.ndarray:
        """Index of the term that is exactly ``x_k`` for each label (-1 if absent)."""
        out = np.full(self.n_labels, -1, dtype=np.int64)
        for j, row in enumerate(self.term_exponents):
            if row.sum() == 1:
                out[int(np.argmax(row))] = j
        return out

    def fit(self, labels: np.ndarray) -> "PolynomialVectorizer":
        """Learn pivots (median) and scales (central 95% range) from training labels (NaN ignored)."""
        labels = np.asarray(labels, dtype=float)
        if labels.ndim != 2 or labels.shape[1] != self.n_labels:
            raise InvalidInputError(
                f"labels must have shape (n_stars, {self.n_labels}); got {labels.shape}"
            )
        with np.errstate(all="ignore"):
            finite = np.isfinite(labels)
            pivots = np.zeros(self.n_labels)
            scales = np.ones(self.n_labels)
            for k in range(self.n_labels):
                column = labels[finite[:, k], k]
                if column.size == 0:
                    raise InvalidInputError(
                        f"label '{self.label_names[k]}' has no finite value in the training labels"
                    )
                pivots[k] = np.median(column)
                low, high = np.percentile(column, [2.5, 97.5])
                spread = high - low
                if not spread > 0:
                    spread = np.ptp(column)
                scales[k] = spread if spread > 0 else 1.0
        self.pivots, self.scales = pivots, scales
        return self

    def _check_fitted(self) -> None:
        if self.pivots is None or self.scales is None:
            raise InvalidInputError("the vectorizer has no pivots/scales: call fit(labels) first")

    def scale(self, labels: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return (np.asarray(labels, dtype=float) - self.pivots) / self.scales

    def unscale(self, scaled: np.ndarray) -> np.ndarray:
        self._check_fitted()
        return np.asarray(scaled, dtype=float) * self.scales + self.pivots

    # ------------------------------------------------------------ the matrices
    def design_matrix_scaled(self, scaled: np.ndarray) -> np.ndarray:
        """Design matrix from already scaled labels; shape (n_stars, n_terms)."""
        return monomials(np.atleast_2d(np.asarray(scaled, dtype=float)), self.term_exponents)

    def design_matrix(self, labels: np.ndarray) -> np.ndarray:
        """Design matrix ``A`` of shape (n_stars, n_terms) for labels in physical units."""
        return self.design_matrix_scaled(self.scale(np.atleast_2d(labels)))

    def jacobian_scaled(self, scaled: np.ndarray) -> np.ndarray:
        """d A / d x for scaled labels; shape (n_stars, n_terms, n_labels)."""
        return monomial_jacobian(np.atleast_2d(np.asarray(scaled, dtype=float)), self.term_exponents)

    def jacobian(self, labels: np.ndarray) -> np.ndarray:
        """d A / d label in physical units; shape (n_stars, n_terms, n_labels)."""
        return self.jacobian_scaled(self.scale(np.atleast_2d(labels))) / self.scales

    def __repr__(self) -> str:
        return (
            f"PolynomialVectorizer(label_names={self.label_names}, order={self.order}, "
            f"n_terms={self.n_terms})"
        )
