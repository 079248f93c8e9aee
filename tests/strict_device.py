"""A CuPy-like array module over numpy that keeps "device" and host arrays apart, as CuPy does.

CI has no GPU, so the ``cupy`` backend's code path runs there with an array module standing in for
CuPy. With plain numpy as that module, code that mixes host and device arrays still works, and a GPU
would be the first to see the error. This module refuses what CuPy refuses:

* a numpy array of one or more dimensions as an operand of a device array's arithmetic or of a
  module function (CuPy raises ``TypeError``); moving data to the device is explicit (``asarray``);
* implicit conversion of a device array to numpy (``np.asarray(device)``; CuPy: ``TypeError``);
  ``.get()`` is the way back, as in CuPy;
* indexing a numpy array with a device array;

``linalg.cholesky`` does not raise for a matrix that is not positive definite (CuPy's default) and returns
a finite lower triangle that is not its factor (CuPy leaves a partly factored matrix), so code must
detect failed factorisations itself.

and it makes ``einsum`` return a new array, never a view of its operand (numpy returns a writable
view for a diagonal such as ``"mii->mi"``; CuPy does not promise one), so in-place writes through
such a result are caught as wrong answers.
"""
from __future__ import annotations

import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin


class HostDeviceMixError(TypeError):
    """A host (numpy) array was used where CuPy needs a device array."""


class ImplicitTransferError(RuntimeError):
    """A device array was converted to numpy implicitly (CuPy raises TypeError; numpy would catch a
    TypeError from ``__array__`` and read the array as a sequence instead, so this one is not one)."""


def _unwrap(value):
    """The numpy array behind a device value; host arrays of one or more dimensions are refused."""
    if isinstance(value, DeviceArray):
        return value._array
    if isinstance(value, np.ndarray) and value.ndim > 0:
        raise HostDeviceMixError(f"a host numpy array of shape {value.shape} was mixed with device arrays: "
                                 "move it with xp.asarray first")
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(item) for item in value)
    return value


def _unwrap_key(key):
    # numpy (host) index arrays are accepted in a device array's subscript, as CuPy accepts them
    if isinstance(key, DeviceArray):
        return key._array
    if isinstance(key, tuple):
        return tuple(_unwrap_key(item) for item in key)
    return key


def _wrap(value):
    if isinstance(value, np.ndarray):
        return DeviceArray(value)
    if isinstance(value, np.generic):  # CuPy reductions and full indexing give 0-d device arrays
        return DeviceArray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(item) for item in value)
    if isinstance(value, list):
        return [_wrap(item) for item in value]
    return value


class DeviceArray(NDArrayOperatorsMixin):
    """A numpy array that plays a CuPy array: arithmetic and module functions keep it on the "device"."""

    __slots__ = ("_array",)

    def __init__(self, array: np.ndarray):
        self._array = array

    # -- the ways back to the host
    def __array__(self, dtype=None, copy=None):
        raise ImplicitTransferError("Implicit conversion to a NumPy array is not allowed (CuPy); use .get()")

    def get(self) -> np.ndarray:
        return self._array.copy()

    def item(self):
        return self._array.item()

    def __float__(self):
        return float(self._array)

    def __int__(self):
        return int(self._array)

    def __bool__(self):
        return bool(self._array)

    def __len__(self):
        return len(self._array)

    def __iter__(self):
        return (_wrap(row) for row in self._array)

    def __repr__(self):
        return f"DeviceArray({self._array!r})"

    # -- numpy protocols: numpy functions and ufuncs on device arrays run "on the device"
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_unwrap(item) for item in out)
        result = getattr(ufunc, method)(*(_unwrap(item) for item in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_unwrap(args), **{key: _unwrap(value) for key, value in kwargs.items()}))

    # -- indexing
    def __getitem__(self, key):
        return _wrap(self._array[_unwrap_key(key)])

    def __setitem__(self, key, value):
        self._array[_unwrap_key(key)] = _unwrap(value)

    # -- attributes and methods of the array, results kept on the device
    @property
    def T(self):
        return DeviceArray(self._array.T)

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__ & co.: numpy would read the array through them
            raise AttributeError(name)
        attribute = getattr(self._array, name)
        if callable(attribute):
            def method(*args, **kwargs):
                return _wrap(attribute(*_unwrap(args), **{key: _unwrap(value) for key, value in kwargs.items()}))
            return method
        return _wrap(attribute)


#: functions that move data onto the device: they take host arrays
_TRANSFERS = {"asarray", "array", "ascontiguousarray", "asanyarray"}


class StrictModule(types.ModuleType):
    """``numpy`` (or ``numpy.linalg``) with every function taking and returning device arrays."""

    def __init__(self, module=np, name: str = "strict_device"):
        super().__init__(name)
        self._module = module
        self.ndarray = DeviceArray
        if module is np:
            self.linalg = StrictModule(np.linalg, f"{name}.linalg")

    def __getattr__(self, name):
        attribute = getattr(self._module, name)
        if isinstance(attribute, type) or not callable(attribute):
            return attribute  # dtypes, constants, exception classes
        if name in _TRANSFERS:
            def transfer(value, *args, **kwargs):
                if isinstance(value, DeviceArray):
                    return DeviceArray(attribute(value._array, *args, **kwargs))
                return DeviceArray(np.array(attribute(value, *args, **kwargs), copy=True))
            return transfer
        if name == "cholesky" and self._module is np.linalg:
            def cholesky(matrices):
                batch = _unwrap(matrices)
                try:
                    return DeviceArray(np.linalg.cholesky(batch))
                except np.linalg.LinAlgError:
                    out = np.tril(batch).copy()
                    flat, factors = batch.reshape(-1, *batch.shape[-2:]), out.reshape(-1, *batch.shape[-2:])
                    for k, matrix in enumerate(flat):
                        try:
                            factors[k] = np.linalg.cholesky(matrix)
                        except np.linalg.LinAlgError:
                            pass  # left as the finite lower triangle of the matrix: not a factor
                    return DeviceArray(out)
            return cholesky
        if name == "einsum":
            def einsum(*args, **kwargs):
                return DeviceArray(np.array(np.einsum(*_unwrap(args), **kwargs), copy=True))
            return einsum

        def function(*args, **kwargs):
            return _wrap(attribute(*_unwrap(args), **{key: _unwrap(value) for key, value in kwargs.items()}))
        return function


def strict_module() -> StrictModule:
    return StrictModule()
