"""A software prefetch for numba kernels (LLVM's ``llvm.prefetch``).

The photometry reads about 43 short pieces of image rows per star, each
row a page apart: the loads miss the cache one after another while the
clipping of the sky, which needs no memory, leaves the memory system idle.
Asking for the next star's rows before that clipping overlaps the two.
A prefetch is only a hint: it never faults, changes no value, and an
address off the array costs nothing but a wasted request (the callers
stay inside their arrays anyway).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["prefetch2d"]


@intrinsic
def prefetch2d(typingctx, arr, j, i):
    """Ask for the cache line holding ``arr[j, i]`` (2-D array) to be brought into every cache level.

    Read prefetch with the highest temporal locality (x86 ``prefetcht0``);
    no bounds check. The parent array and both indices, so that a kernel
    prefetching the rows of a box creates no row views (in numba each view
    costs an atomic reference-count increment and decrement).
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and isinstance(j, types.Integer)
            and isinstance(i, types.Integer)):
        return None
    sig = types.void(arr, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]], wraparound=False,
                                       boundscheck=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read (0), locality 3 (keep in all levels), data cache (1)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen
