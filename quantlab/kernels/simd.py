"""Sixteen lanes at once for the CPU kernels: Numba intrinsics written in LLVM IR.

- ``quantize16``: the code index of x / absmax, sixteen elements at a time: the IEEE division, the
  table search of lookup.py as two gathers (``llvm.masked.gather``), one compare. LLVM does not
  vectorise the scalar search by itself (the stores into the indices could alias the tables as
  far as it can prove); scalar, the two searches were half of an 8-bit Adam step.
- ``largest_magnitude``: the block absmax as an int32 maximum of the magnitude bits. Numba widens
  int32 arithmetic to int64, and LLVM kept the auto-vectorised maximum in int64 lanes.

A gather runs as a hardware gather on AVX2/AVX-512 CPUs and as scalar loads elsewhere, with the
same results. The lane arithmetic is the scalar kernels' (``scalar.search``), so results are
bit-identical to them. A gather is not always faster: for dequantization (one load from a
256-entry table) LLVM's scalar loop beat it on this project's CPU, so that stays a plain loop.
Arrays must be contiguous and hold ``start + 16`` elements; the callers (cpu.py) loop over whole
groups of sixteen and finish the tail one by one.
"""
from __future__ import annotations

from llvmlite import ir
from llvmlite.ir.instructions import GEPInstr
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

LANES = 16
_I1, _I8, _I32, _I64, _F32 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vector(element):
    return ir.VectorType(element, LANES)


def _splat(builder, value):
    """value in every lane."""
    lanes = builder.insert_element(ir.Constant(_vector(value.type), ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(lanes, lanes, ir.Constant(_vector(_I32), [0] * LANES))


def _constant(element, value):
    return ir.Constant(_vector(element), [value] * LANES)


def _bytes_of(context, builder, array_type, array):
    return builder.bitcast(context.make_array(array_type)(context, builder, array).data, ir.PointerType(_I8))


def _at(builder, base_bytes, byte_offset, element):
    """A pointer to the sixteen ``element``s that start byte_offset bytes after base_bytes."""
    return builder.bitcast(builder.gep(base_bytes, [byte_offset]), ir.PointerType(_vector(element)))


def _gather(builder, element, base_bytes, byte_offsets, align):
    """Sixteen loads of ``element`` at base_bytes + byte_offsets (an int32 vector)."""
    # llvmlite's builder.gep cannot take a vector of indices: build the instruction by hand
    addresses = GEPInstr(builder.block, base_bytes, [byte_offsets], False, "", source_etype=_I8)
    addresses.type = _vector(base_bytes.type)
    builder._insert(addresses)
    pointers = builder.bitcast(addresses, _vector(ir.PointerType(element)))
    vector = _vector(element)
    name = f"llvm.masked.gather.v{LANES}{element.intrinsic_name}.v{LANES}p0"
    gather = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        vector, [pointers.type, _I32, _vector(_I1), vector]), name)
    everything = _constant(_I1, 1)
    return builder.call(gather, [pointers, ir.Constant(_I32, align), everything, ir.Constant(vector, ir.Undefined)])


def _check_arrays(name, **arrays):
    for what, (array, dtype) in arrays.items():
        if not (isinstance(array, types.Array) and array.ndim == 1 and array.dtype == dtype and array.layout == "C"):
            raise TypingError(f"{name}: {what} must be a contiguous 1-D {dtype} array, got {array}")


def _int64(context, builder, value, value_type):
    return context.cast(builder, value, value_type, types.int64)


@intrinsic
def quantize16(typingctx, x, scale, table, points, shift, bias, out, start):
    """out[start + k] = scalar.search(x[start + k] / scale, ...) for k < 16: the code index of
    u = x / scale (IEEE division, as the scalar kernels), count(points < u) by the table (lookup.py),
    for -1 <= u <= 1, where the key arithmetic fits int32 (|key| <= 0x3F800000). There is no byte
    gather: the uint8 table is gathered four bytes a lane and masked to the low byte, which is why
    lookup.SearchTable pads it with three bytes."""
    _check_arrays("quantize16", x=(x, types.float32), table=(table, types.uint8), points=(points, types.float32),
                  out=(out, types.uint8))
    if scale != types.float32:
        raise TypingError(f"quantize16: scale must be float32, got {scale}")

    def codegen(context, builder, signature, args):
        x_, scale_, table_, points_, shift_, bias_, out_, start_ = args
        x_type, _, table_type, points_type, shift_type, bias_type, out_type, start_type = signature.args
        start64 = _int64(context, builder, start_, start_type)
        lanes = builder.load(_at(builder, _bytes_of(context, builder, x_type, x_),
                                 builder.mul(start64, ir.Constant(_I64, 4)), _F32), align=4)
        u = builder.fdiv(lanes, _splat(builder, scale_))
        bits = builder.bitcast(u, _vector(_I32))
        key = builder.xor(bits, builder.and_(builder.ashr(bits, _constant(_I32, 31)), _constant(_I32, 0x7FFFFFFF)))
        bias32 = builder.trunc(_int64(context, builder, bias_, bias_type), _I32)
        shift32 = builder.trunc(_int64(context, builder, shift_, shift_type), _I32)
        bucket = builder.lshr(builder.add(key, _splat(builder, bias32)), _splat(builder, shift32))
        below = builder.and_(_gather(builder, _I32, _bytes_of(context, builder, table_type, table_), bucket, 1),
                             _constant(_I32, 0xFF))
        point = _gather(builder, _F32, _bytes_of(context, builder, points_type, points_),
                        builder.shl(below, _constant(_I32, 2)), 4)
        index = builder.add(below, builder.zext(builder.fcmp_ordered("<", point, u), _vector(_I32)))
        builder.store(builder.trunc(index, _vector(_I8)),
                      _at(builder, _bytes_of(context, builder, out_type, out_), start64, _I8), align=1)
        return context.get_dummy_value()

    return types.void(x, scale, table, points, shift, bias, out, start), codegen


@intrinsic
def largest_magnitude(typingctx, bits):
    """max(bits[i] & 0x7FFFFFFF) over a contiguous int32 array (0 when empty): four sixteen-lane
    int32 accumulators, then the tail one by one."""
    _check_arrays("largest_magnitude", bits=(bits, types.int32))

    def codegen(context, builder, signature, args):
        (bits_type,), (bits_,) = signature.args, args
        array = context.make_array(bits_type)(context, builder, bits_)
        n, data = array.nitems, builder.bitcast(array.data, ir.PointerType(_I8))
        unroll = 4
        groups = builder.udiv(n, ir.Constant(_I64, LANES * unroll))
        accumulators = [cgutils.alloca_once_value(builder, _constant(_I32, 0)) for _ in range(unroll)]
        magnitude = _constant(_I32, 0x7FFFFFFF)

        def larger(a, b):
            return builder.select(builder.icmp_signed(">", a, b), a, b)

        with cgutils.for_range(builder, groups) as loop:
            first = builder.mul(loop.index, ir.Constant(_I64, LANES * unroll))
            for k, accumulator in enumerate(accumulators):
                offset = builder.mul(builder.add(first, ir.Constant(_I64, LANES * k)), ir.Constant(_I64, 4))
                lanes = builder.and_(builder.load(_at(builder, data, offset, _I32), align=4), magnitude)
                builder.store(larger(lanes, builder.load(accumulator)), accumulator)
        vector = builder.load(accumulators[0])
        for accumulator in accumulators[1:]:
            vector = larger(vector, builder.load(accumulator))
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_vector(_I32)]),
                                                f"llvm.vector.reduce.smax.v{LANES}i32")
        largest = cgutils.alloca_once_value(builder, builder.call(reduce, [vector]))
        tail = builder.mul(groups, ir.Constant(_I64, LANES * unroll))
        with cgutils.for_range_slice(builder, tail, n, ir.Constant(_I64, 1)) as (i, _):
            element = builder.and_(builder.load(builder.gep(array.data, [i])), ir.Constant(_I32, 0x7FFFFFFF))
            builder.store(larger(element, builder.load(largest)), largest)
        return builder.load(largest)

    return types.int32(bits), codegen
