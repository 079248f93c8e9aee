"""Constructor-parameter rules of the estimators, declared once in scikit-learn's vocabulary.

Each estimator class sets ``_parameter_constraints`` to one of the dicts below and calls
:func:`validate_parameters` first thing in ``fit``: a parameter outside its rule raises
:class:`cannon_bridge.errors.InvalidParameterError` naming the parameter, the estimator, the
allowed values and the value given, before any data is read.

The rules only depend on each parameter itself; checks that need the data (``cv_folds`` at most
the number of stars, ``label_names`` as many as the label columns, ...) stay in ``fit``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Set, Sized
from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions, _Constraint
from sklearn.utils._param_validation import InvalidParameterError as _SkInvalidParameterError
from sklearn.utils._param_validation import validate_parameter_constraints

from .backends import BACKEND_NAMES

from .errors import InvalidParameterError


__all__ = ["BRIDGE_MODEL_CONSTRAINTS", "CANNON_MODEL_CONSTRAINTS", "InvalidParameterError", "validate_parameters"]


# ------------------------------------------------------------------------------ constraints
class NumberInterval(Interval):
    """scikit-learn's :class:`Interval` that refuses booleans (``True`` is an ``int`` to Python)."""

    def is_satisfied_by(self, val) -> bool:
        return not isinstance(val, (bool, np.bool_)) and super().is_satisfied_by(val)


class _Rule(HasMethods):
    """Base of this module's own constraints.

    scikit-learn's ``make_constraint`` (used by ``validate_parameter_constraints`` and by
    ``check_param_validation``) accepts only its own constraint classes, so these derive
    from :class:`HasMethods` (with no methods), the most neutral of them.
    """

    def __init__(self) -> None:
        _Constraint.__init__(self)
        self.methods = []


def _ordered_collection(val) -> bool:
    """A list, tuple, 1-D array, pandas Index/Series...: sized, iterable, ordered, not a string."""
    if isinstance(val, (str, bytes, Mapping, Set)):
        return False
    return isinstance(val, Iterable) and isinstance(val, Sized) and getattr(val, "ndim", 1) == 1


class StrSequence(_Rule):
    """A sequence of distinct ``str`` (non-empty when ``non_empty``)."""

    def __init__(self, non_empty: bool = False) -> None:
        super().__init__()
        self.non_empty = non_empty

    def is_satisfied_by(self, val) -> bool:
        if not _ordered_collection(val):
            return False
        items = list(val)
        return (bool(items) or not self.non_empty) and all(isinstance(item, str) for item in items) \
            and len(set(items)) == len(items)

    def __str__(self) -> str:
        return f"a {'non-empty ' if self.non_empty else ''}sequence of distinct str"


class NumberSequence(_Rule):
    """A non-empty 1-D sequence of numbers, each satisfying ``interval``."""

    def __init__(self, interval: Interval) -> None:
        super().__init__()
        self.interval = interval

    def is_satisfied_by(self, val) -> bool:
        if not _ordered_collection(val):
            return False
        items = list(val)
        return bool(items) and all(self.interval.is_satisfied_by(item) for item in items)

    def __str__(self) -> str:
        kind, rest = str(self.interval).split(" ", 2)[1:]  # "a float in the range ..." -> "float", "in ..."
        return f"a non-empty 1-D sequence of {kind}s {rest}"


class TableWithColumns(_Rule):
    """A table with (at least) the named columns: an astropy Table, a pandas DataFrame or a
    numpy structured array (anything indexed by column name and by a boolean row mask)."""

    def __init__(self, columns: tuple[str, ...]) -> None:
        super().__init__()
        self.columns = tuple(columns)

    @staticmethod
    def _column_names(val):
        if isinstance(val, np.ndarray):  # structured array (None for a plain one)
            return val.dtype.names
        names = getattr(val, "colnames", None)  # astropy Table / QTable
        if names is None and hasattr(val, "columns") and hasattr(val, "iloc"):  # pandas DataFrame
            names = list(val.columns)
        return names

    def is_satisfied_by(self, val) -> bool:
        names = self._column_names(val)
        return names is not None and set(self.columns) <= set(names)

    def __str__(self) -> str:
        return f"a table (astropy Table, pandas DataFrame or structured array) with columns {list(self.columns)}"


def _int(low: int) -> NumberInterval:
    return NumberInterval(Integral, low, None, closed="left")


_NON_NEGATIVE = NumberInterval(Real, 0, np.inf, closed="left")  # finite: inf is refused
_POSITIVE = NumberInterval(Real, 0, np.inf, closed="neither")
_BACKENDS = StrOptions(set(BACKEND_NAMES))
_LINELIST = TableWithColumns(("wavelength", "element", "ion", "log_gf", "excitation_potential"))

#: ``CannonModel.__init__`` parameter -> allowed values (any one of the list).
CANNON_MODEL_CONSTRAINTS: dict = {
    "label_names": [None, StrSequence(non_empty=True)],
    "order": [_int(1)],
    "regularization": [_NON_NEGATIVE],
    "censors": [None, Mapping],
    "backend": [_BACKENDS],
    "scatter_iterations": [_int(0)],
    "max_iter": [_int(1)],
    "block_size": [_int(1)],
    "chunk_size": [_int(1)],
    "low_snr": [_NON_NEGATIVE],
    "progress": ["boolean"],
    "coefficient_uncertainty": ["boolean"],
}

#: ``BridgeModel.__init__`` parameter -> allowed values (any one of the list).
BRIDGE_MODEL_CONSTRAINTS: dict = {
    "core_labels": [StrSequence(non_empty=True)],
    "heavy_labels": [StrSequence()],
    "order": [_int(1)],
    "censoring": [StrOptions({"linelist"}), None],
    "apogee_order": [_int(1), None],
    "galah_order": [_int(1), None],
    "apogee_regularization": [_NON_NEGATIVE, NumberSequence(_NON_NEGATIVE)],
    "galah_regularization": [_NON_NEGATIVE, NumberSequence(_NON_NEGATIVE)],
    "backend": [_BACKENDS],
    "galah_linelist": [None, _LINELIST],
    "galah_mode_mask": [None, TableWithColumns(("element", "mask_start", "mask_end"))],
    "apogee_linelist": [None, _LINELIST],
    "galah_resolution": [_POSITIVE],
    "apogee_resolution": [_POSITIVE],
    "window_fwhm": [_POSITIVE],
    "line_depth_range": [NumberInterval(Real, 0, None, closed="both")],  # inf: every line of the element
    "band_limit_training": ["boolean"],
    "prior": ["boolean"],
    "joint": [StrOptions({"fusion", "stacked"})],
    "calibrate": ["boolean"],
    "cv_folds": [_int(2)],  # at most the number of stars: checked by fit
    "label_samples": [_int(0)],
    "coefficient_uncertainty": ["boolean"],
    "scatter_iterations": [_int(0)],
    "max_iter": [_int(1)],
    "chunk_size": [_int(1)],
    "random_state": ["random_state"],  # what sklearn's KFold takes: int in [0, 2**32 - 1], RandomState, None
    "progress": ["boolean"],
}


# ------------------------------------------------------------------------------- validation
def validate_parameters(estimator) -> None:
    """Check an estimator's constructor parameters against its class's ``_parameter_constraints``.

    Parameters
    ----------
    estimator : BaseEstimator
        An estimator whose class sets ``_parameter_constraints`` (parameter name -> list of
        scikit-learn constraints, any one of which a valid value satisfies).

    Raises
    ------
    InvalidParameterError
        When a parameter satisfies none of its constraints, e.g. ``The 'order' parameter of
        CannonModel must be an int in the range [1, inf). Got 0 instead.`` It is an
        :class:`~cannon_bridge.errors.InvalidInputError` and scikit-learn's ``InvalidParameterError``.
    """
    cls = type(estimator)
    for name, value in estimator.get_params(deep=False).items():  # one at a time: the failing value is known
        try:
            validate_parameter_constraints(cls._parameter_constraints, {name: value}, caller_name=cls.__name__)
        except _SkInvalidParameterError as exc:
            message, shown = str(exc), repr(value)
            if "\n" in shown:  # a table or a large array: its first line keeps the message on one line
                message = message.replace(f"Got {shown} instead.", f"Got {shown.splitlines()[0]} ... instead.")
            raise InvalidParameterError(message) from None
