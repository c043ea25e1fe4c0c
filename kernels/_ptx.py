"""Inline-PTX intrinsics for the GPU side of ``primitives`` (never imported under the simulator).

Each intrinsic is one PTX instruction (or a short fixed sequence) emitted through
``llvmlite.ir.InlineAsm``; several results come back through a literal struct.
Requires sm_80+ (cvt.rn.bf16x2.f32, mma.m16n8k16 with bf16).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.cuda import cgutils
from numba.cuda.extending import intrinsic

_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def _asm(builder, ret_ir, arg_irs, text, constraints, args):
    fn_type = ir.FunctionType(ret_ir, arg_irs)
    return builder.call(ir.InlineAsm(fn_type, text, constraints, side_effect=False), args)


def _unpack(context, builder, struct_val, n, return_type):
    items = [builder.extract_value(struct_val, k) for k in range(n)]
    return context.make_tuple(builder, return_type, items)


@intrinsic
def load_16b(typingctx, words, index):
    """16 bytes (4 int32 words) from words[index:index+4] via ld.global.nc.v4.u32."""
    if not (isinstance(words, types.Array) and words.ndim == 1 and words.dtype == types.int32):
        return None
    if not isinstance(index, types.Integer):
        return None
    ret = types.UniTuple(types.int32, 4)

    def codegen(context, builder, sig, args):
        ary_ty, idx_ty = sig.args
        ary, idx = args
        ary_struct = context.make_array(ary_ty)(context, builder, value=ary)
        idx64 = context.cast(builder, idx, idx_ty, types.int64)
        ptr = cgutils.get_item_pointer(context, builder, ary_ty, ary_struct, [idx64], wraparound=False)
        struct_ty = ir.LiteralStructType([_I32] * 4)
        res = _asm(
            builder,
            struct_ty,
            [ptr.type],
            "ld.global.nc.v4.u32 {$0, $1, $2, $3}, [$4];",
            "=r,=r,=r,=r,l",
            [ptr],
        )
        return _unpack(context, builder, res, 4, sig.return_type)

    return ret(words, index), codegen


def _word_to_pair(text):
    @intrinsic
    def impl(typingctx, word):
        if not isinstance(word, types.Integer):
            return None
        ret = types.UniTuple(types.float32, 2)

        def codegen(context, builder, sig, args):
            w = context.cast(builder, args[0], sig.args[0], types.int32)
            res = _asm(builder, ir.LiteralStructType([_F32, _F32]), [_I32], text, "=f,=f,r", [w])
            return _unpack(context, builder, res, 2, sig.return_type)

        return ret(word), codegen

    return impl


unpack_f16x2 = _word_to_pair("{.reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi;}")
unpack_bf16x2 = _word_to_pair(
    "{.reg .b32 t0, t1; shl.b32 t0, $2, 16; and.b32 t1, $2, 0xFFFF0000; mov.b32 $0, t0; mov.b32 $1, t1;}"
)


def _pair_to_word(text):
    @intrinsic
    def impl(typingctx, lo, hi):
        if not (isinstance(lo, types.Number) and isinstance(hi, types.Number)):
            return None

        def codegen(context, builder, sig, args):
            flo = context.cast(builder, args[0], sig.args[0], types.float32)
            fhi = context.cast(builder, args[1], sig.args[1], types.float32)
            return _asm(builder, _I32, [_F32, _F32], text, "=r,f,f", [flo, fhi])

        return types.int32(lo, hi), codegen

    return impl


# the first source goes to the upper half: pass (hi, lo) so that lo lands in the low 16 bits
pack_f16x2 = _pair_to_word("cvt.rn.f16x2.f32 $0, $2, $1;")
pack_bf16x2 = _pair_to_word("cvt.rn.bf16x2.f32 $0, $2, $1;")


@intrinsic
def bits_to_f32(typingctx, word):
    if not isinstance(word, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        w = context.cast(builder, args[0], sig.args[0], types.int32)
        return builder.bitcast(w, _F32)

    return types.float32(word), codegen


@intrinsic
def f32_to_bits(typingctx, x):
    if not isinstance(x, types.Number):
        return None

    def codegen(context, builder, sig, args):
        f = context.cast(builder, args[0], sig.args[0], types.float32)
        return builder.bitcast(f, _I32)

    return types.int32(x), codegen


@intrinsic
def max_nan(typingctx, a, b):
    """max(a, b) as float32, NaN when either is NaN, via max.NaN.f32 (one FMNMX; sm_80+)."""
    if not isinstance(a, types.Number) or not isinstance(b, types.Number):
        return None

    def codegen(context, builder, sig, args):
        fa = context.cast(builder, args[0], sig.args[0], types.float32)
        fb = context.cast(builder, args[1], sig.args[1], types.float32)
        return _asm(builder, _F32, [_F32, _F32], "max.NaN.f32 $0, $1, $2;", "=f,f,f", [fa, fb])

    return types.float32(a, b), codegen


@intrinsic
def ex2(typingctx, x):
    """2**x via ex2.approx.ftz.f32 (max rel. error 2**-22; denormal results flush to zero)."""
    if not isinstance(x, types.Number):
        return None

    def codegen(context, builder, sig, args):
        f = context.cast(builder, args[0], sig.args[0], types.float32)
        return _asm(builder, _F32, [_F32], "ex2.approx.ftz.f32 $0, $1;", "=f,f", [f])

    return types.float32(x), codegen


def _mma(ab_type):
    text = (
        f"mma.sync.aligned.m16n8k16.row.col.f32.{ab_type}.{ab_type}.f32 "
        "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};"
    )
    constraints = "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f"

    @intrinsic
    def impl(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        ret = types.UniTuple(types.float32, 4)
        sig = ret(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

        def codegen(context, builder, sig, args):
            ints = [context.cast(builder, v, t, types.int32) for v, t in zip(args[:6], sig.args[:6])]
            floats = [context.cast(builder, v, t, types.float32) for v, t in zip(args[6:], sig.args[6:])]
            res = _asm(
                builder, ir.LiteralStructType([_F32] * 4), [_I32] * 6 + [_F32] * 4, text, constraints, ints + floats
            )
            return _unpack(context, builder, res, 4, sig.return_type)

        return sig, codegen

    return impl


mma_f16_16816 = _mma("f16")
mma_bf16_16816 = _mma("bf16")


# ---- cp.async: 16-byte global -> shared copies, completed by commit/wait groups (sm_80+) --------


def _element_pointer(context, builder, ary_ty, ary, idx, idx_ty):
    ary_struct = context.make_array(ary_ty)(context, builder, value=ary)
    idx64 = context.cast(builder, idx, idx_ty, types.int64)
    return cgutils.get_item_pointer(context, builder, ary_ty, ary_struct, [idx64], wraparound=False)


@intrinsic
def cp_async_16(typingctx, dst, dst_index, src, src_index, valid):
    """cp.async.cg.shared.global 16 B: src[src_index:+4] -> dst[dst_index:+4] (int32 word arrays;
    dst in shared memory, 16-byte aligned); ``valid`` false: ignore-src, the 16 bytes are zero-filled
    and nothing is read."""
    for ary in (dst, src):
        if not (isinstance(ary, types.Array) and ary.ndim == 1 and ary.dtype == types.int32):
            return None
    if not all(isinstance(t, (types.Integer, types.Boolean)) for t in (dst_index, src_index, valid)):
        return None

    def codegen(context, builder, sig, args):
        dst_ty, di_ty, src_ty, si_ty, valid_ty = sig.args
        dst_v, di, src_v, si, ok = args
        dptr = _element_pointer(context, builder, dst_ty, dst_v, di, di_ty)
        sptr = _element_pointer(context, builder, src_ty, src_v, si, si_ty)
        shared_ptr = builder.addrspacecast(dptr, ir.PointerType(_I32, 3))
        saddr = builder.ptrtoint(shared_ptr, _I32)
        ok32 = context.cast(builder, ok, valid_ty, types.int32)
        fn_type = ir.FunctionType(ir.VoidType(), [_I32, sptr.type, _I32])
        # the ignore-src predicate form (PTX 7.5): one predicated LDGSTS .ZFILL, no src-size arithmetic
        text = ("{.reg .u64 g; .reg .pred z; cvta.to.global.u64 g, $1; setp.eq.s32 z, $2, 0; "
                "cp.async.cg.shared.global [$0], [g], 16, z;}")
        builder.call(ir.InlineAsm(fn_type, text, "r,l,r,~{memory}", side_effect=True), [saddr, sptr, ok32])
        return context.get_dummy_value()

    return types.none(dst, dst_index, src, src_index, valid), codegen


@intrinsic
def cp_async_commit(typingctx):
    """cp.async.commit_group: close the thread's open group of copies."""

    def codegen(context, builder, sig, args):
        fn_type = ir.FunctionType(ir.VoidType(), [])
        builder.call(ir.InlineAsm(fn_type, "cp.async.commit_group;", "~{memory}", side_effect=True), [])
        return context.get_dummy_value()

    return types.none(), codegen


def cp_async_wait_group(pending: int):
    """An intrinsic ``wait()``: cp.async.wait_group ``pending`` (a compile-time count)."""
    n = int(pending)

    @intrinsic
    def wait(typingctx):
        def codegen(context, builder, sig, args):
            fn_type = ir.FunctionType(ir.VoidType(), [])
            asm = ir.InlineAsm(fn_type, f"cp.async.wait_group {n};", "~{memory}", side_effect=True)
            builder.call(asm, [])
            return context.get_dummy_value()

        return types.none(), codegen

    return wait


@intrinsic
def load_shared_16b(typingctx, words, index):
    """16 bytes (4 int32 words) from a shared-memory word array at words[index:index+4] (16-byte
    aligned) via ld.shared.v4.u32."""
    if not (isinstance(words, types.Array) and words.ndim == 1 and words.dtype == types.int32):
        return None
    if not isinstance(index, types.Integer):
        return None
    ret = types.UniTuple(types.int32, 4)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        saddr = builder.ptrtoint(builder.addrspacecast(ptr, ir.PointerType(_I32, 3)), _I32)
        fn_type = ir.FunctionType(ir.LiteralStructType([_I32] * 4), [_I32])
        asm = ir.InlineAsm(fn_type, "ld.shared.v4.u32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,r,~{memory}", side_effect=True)
        res = builder.call(asm, [saddr])
        return _unpack(context, builder, res, 4, sig.return_type)

    return ret(words, index), codegen


# ---- ldmatrix: four 8x8 b16 matrices from shared memory into mma fragments (sm_75+) ------------


def _ldmatrix(trans: str):
    @intrinsic
    def impl(typingctx, words, index):
        """ldmatrix.sync.aligned.m8n8.x4: this lane gives the address of one 16-byte row (shared word
        array, 16-byte aligned); returns the lane's 4 fragment words."""
        if not (isinstance(words, types.Array) and words.ndim == 1 and words.dtype == types.int32):
            return None
        if not isinstance(index, types.Integer):
            return None
        ret = types.UniTuple(types.int32, 4)

        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            saddr = builder.ptrtoint(builder.addrspacecast(ptr, ir.PointerType(_I32, 3)), _I32)
            fn_type = ir.FunctionType(ir.LiteralStructType([_I32] * 4), [_I32])
            text = f"ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 {{$0, $1, $2, $3}}, [$4];"
            res = builder.call(ir.InlineAsm(fn_type, text, "=r,=r,=r,=r,r,~{memory}", side_effect=True), [saddr])
            return _unpack(context, builder, res, 4, sig.return_type)

        return ret(words, index), codegen

    return impl


ldmatrix_x4 = _ldmatrix("")
ldmatrix_x4_trans = _ldmatrix(".trans")
