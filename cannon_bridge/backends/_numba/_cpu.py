"""How the numba kernels meet the CPU: compile flags, feature probing, the prefetch hint, flat row views."""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

# reassociation lets LLVM vectorise the dot products and sums; no 'nnan'/'ninf' (the scatter fit
# relies on inf), no reciprocal approximations
_REDUCE = {"reassoc", "contract", "nsz"}


@intrinsic
def _prefetch(typingctx, array, index):
    """Hint the CPU to bring ``array[index]`` (1-D) into cache (``llvm.prefetch``: read, high locality).

    For strided reads the hardware prefetchers do not follow (one cache line per row of a C-ordered
    array): the fused training kernel asks for the rows a few stars ahead while it copies the current one.
    """
    sig = types.void(array, types.intp)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1]], wraparound=False)
        byte_pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        function_type = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()] + [ir.IntType(32)] * 3)
        function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0i8")
        builder.call(function, [byte_pointer] + [ir.Constant(ir.IntType(32), value) for value in (0, 3, 1)])
        return context.get_dummy_value()

    return sig, codegen


def _prefetch_compiles() -> bool:
    # llvm.prefetch through llvmlite's typed-pointer IR: checked once per process, so that a numba /
    # LLVM pair that rejects it costs the hint, never the kernels that use it
    try:
        @numba.njit(cache=False)
        def probe(values):
            _prefetch(values, 0)
            return values[0]

        probe(np.zeros(1))
        return True
    except Exception:  # any lowering or LLVM error: fall back to no hint
        return False


if not _prefetch_compiles():
    @numba.njit(inline="always")
    def _prefetch(array, index):  # noqa: F811 - the no-op fallback
        pass


@numba.njit(inline="always")
def _prefetch_segment(array, start, width):
    # a row segment of <= 16 values spans at most 3 cache lines (float64), each holding one of these
    _prefetch(array, start)
    if width > 8:
        _prefetch(array, start + 8)
    _prefetch(array, start + width - 1)


def _wide_vector_registers() -> bool:
    # 32 vector registers (AVX-512 targets, even for 256-bit vectors) or 16 (AVX2 and older): decides the
    # register block of the training Gram sums. Numba compiles for the host unless NUMBA_CPU_NAME /
    # NUMBA_CPU_FEATURES name another target (e.g. a portable cache): then for those features
    try:
        features = numba.config.CPU_FEATURES  # numba compiles with these whenever they are set
        if features is None and numba.config.CPU_NAME in (None, "host"):
            from llvmlite import binding

            features = binding.get_host_cpu_features().flatten()
        return "+avx512f" in (features or "").split(",")
    except Exception:  # no answer: the block that fits 16 registers
        return False


def _flat_rows(array):
    """A read-only 1-D view of a 2-D array's rows and the row stride in elements: element (n, m) is
    ``flat[n * stride + m]``. Column blocks of a C-ordered array are views (no copy); every input then
    has the same numba type whatever its layout, so one compiled kernel serves them all."""
    array = np.asarray(array)
    n_rows, n_cols = array.shape
    item = array.itemsize
    row, col = array.strides
    if col != item or row % item or row < n_cols * item:
        array = np.ascontiguousarray(array)
        row = n_cols * item
    span = (n_rows - 1) * (row // item) + n_cols if n_rows else 0
    flat = np.lib.stride_tricks.as_strided(array, shape=(span,), strides=(item,), writeable=False)
    return flat, row // item
