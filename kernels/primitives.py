"""Hardware primitives: one name each, a GPU implementation and an exact simulator emulation.

On a GPU the names below are inline-PTX intrinsics or numba intrinsics; under the numba CUDA
simulator they are Python emulations (warp collectives included: every simulated lane is a real
thread, so a per-warp rendezvous exchanges values exactly). Composed helpers (``warp_sum``,
``load_row8`` ...) are written once on top, for both.

Data convention: every tensor a kernel reads or writes arrives as a flat **int32 word view**
(fp16/bf16 pairs or fp32 bit patterns); compute is fp32; conversion happens at load/store.

    load_16b(words, i)            -> 4 int32 words from words[i:i+4]       (ld.global.nc.v4.u32)
    unpack_f16x2(w), unpack_bf16x2(w) -> (lo, hi) float32                  (cvt.f32.f16 / shift)
    pack_f16x2(lo, hi), pack_bf16x2(lo, hi) -> int32, round to nearest even (cvt.rn.*x2.f32)
    bits_to_f32(w), f32_to_bits(x)                                          (mov.b32)
    ex2(x) -> 2**x                                                          (ex2.approx.ftz.f32)
    max_nan(a, b) -> float32 max, canonical NaN when either is NaN, -0 < +0 (max.NaN.f32)
    shfl_xor_sync(mask, value, lane_mask), shfl_sync(mask, value, src_lane) (shfl.sync)
    mma_f16_16816 / mma_bf16_16816(a0..a3, b0, b1, c0..c3) -> (d0..d3)      (mma.sync m16n8k16)
    cp_async_16(dst_shared, di, src, si, valid)  16 B global -> shared, zeros if not valid
                                                                            (cp.async.cg, src-size 0/16)
    cp_async_commit(); cp_async_wait_group(n)() -> a wait for all but n groups (commit/wait_group)
        simulator: copies land LATE, only at the wait that covers them (the _sim_async module)
    load_shared_16b(words, i)     -> 4 int32 words of a shared array        (ld.shared.v4.u32)
    load_shared_row8(words, w0, kind, dst)   8 elements from a shared word array, widened
    ldmatrix_x4(words, i), ldmatrix_x4_trans(words, i) -> 4 int32 words    (ldmatrix.sync m8n8.x4[.trans].b16)
        lane l gives the shared word index of row l % 8 of matrix l // 8 (16-byte aligned); result m:
        plain: row l // 4, halves 2(l % 4), +1 of matrix m; .trans: column l // 4, rows 2(l % 4), +1
"""

from __future__ import annotations

import numpy as np

from tilegraph._device import SIMULATOR, cuda

FULL_MASK = 0xFFFFFFFF
WARP_SIZE = 32

# dtype codes the kernel templates are specialized on
F16, BF16, F32 = 0, 1, 2
DTYPE_CODES = {"float16": F16, "bfloat16": BF16, "float32": F32}

if SIMULATOR:
    from ._sim_async import commit as _async_commit
    from ._sim_async import copy as _async_copy
    from ._sim_async import wait as _async_wait
    from ._sim_warp import exchange as _exchange

    def load_shared_16b(words, i):
        if i % 4:
            raise IndexError(f"load_shared_16b: word index {i} is not 16-byte aligned")
        return (words[i], words[i + 1], words[i + 2], words[i + 3])

    def _ldmatrix_rows(words, i):
        """Publish this lane's 16-byte row (read before the rendezvous, as the warp's one read)."""
        if i % 4:
            raise IndexError(f"ldmatrix: word index {i} is not 16-byte aligned")
        row = tuple(int(_u32(words[i + k])) for k in range(4))
        lane, slots, lanes = _exchange(FULL_MASK, row)
        if lanes != WARP_SIZE:
            raise RuntimeError("ldmatrix.sync needs a full warp of 32 lanes")
        return lane, slots

    def _word(u):
        return np.int32(np.array([u & 0xFFFFFFFF], dtype=np.uint32).view(np.int32)[0])

    def ldmatrix_x4(words, i):
        lane, slots = _ldmatrix_rows(words, i)
        g, t = lane >> 2, lane & 3
        return tuple(_word(slots[8 * m + g][t]) for m in range(4))

    def ldmatrix_x4_trans(words, i):
        lane, slots = _ldmatrix_rows(words, i)
        g, t = lane >> 2, lane & 3
        shift = 16 * (g & 1)
        out = []
        for m in range(4):
            lo = (slots[8 * m + 2 * t][g >> 1] >> shift) & 0xFFFF
            hi = (slots[8 * m + 2 * t + 1][g >> 1] >> shift) & 0xFFFF
            out.append(_word(lo | (hi << 16)))
        return tuple(out)

    def cp_async_16(dst, dst_index, src, src_index, valid):
        _async_copy(dst, dst_index, src, src_index, valid)

    def cp_async_commit():
        _async_commit()

    def cp_async_wait_group(pending):
        n = int(pending)

        def wait():
            _async_wait(n)

        return wait

    def load_16b(words, i):
        if i % 4:
            raise IndexError(f"load_16b: word index {i} is not 16-byte aligned")
        return (words[i], words[i + 1], words[i + 2], words[i + 3])

    def _u32(word):
        return np.asarray(word).astype(np.int64).astype(np.uint32)

    def unpack_f16x2(word):
        halves = np.array([_u32(word)], dtype=np.uint32).view(np.float16)
        return np.float32(halves[0]), np.float32(halves[1])

    def unpack_bf16x2(word):
        u = int(_u32(word))
        pair = np.array([(u & 0xFFFF) << 16, u & 0xFFFF0000], dtype=np.uint32).view(np.float32)
        return pair[0], pair[1]

    def _bf16_bits(x):
        u = int(np.array([x], dtype=np.float32).view(np.uint32)[0])
        if (u & 0x7F800000) == 0x7F800000 and (u & 0x007FFFFF):
            return 0x7FC0  # canonical NaN, as cvt.rn.bf16 gives
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF

    def pack_f16x2(lo, hi):
        with np.errstate(over="ignore"):  # overflow to inf is the intended rounding
            halves = np.array([lo, hi], dtype=np.float32).astype(np.float16)
        return np.int32(halves.view(np.int32)[0])

    def pack_bf16x2(lo, hi):
        u = _bf16_bits(lo) | (_bf16_bits(hi) << 16)
        return np.int32(np.array([u], dtype=np.uint32).view(np.int32)[0])

    def bits_to_f32(word):
        return np.array([word], dtype=np.int32).view(np.float32)[0]

    def f32_to_bits(x):
        return np.array([x], dtype=np.float32).view(np.int32)[0]

    _FLT_MIN = np.float32(1.1754944e-38)

    def ex2(x):
        with np.errstate(over="ignore"):
            r = np.exp2(np.float32(x))
        return r if r >= _FLT_MIN or r != r else np.float32(0.0)  # .ftz: denormal results flush to 0

    _CANONICAL_NAN = np.array([0x7FFFFFFF], np.uint32).view(np.float32)[0]

    def max_nan(a, b):
        a, b = np.float32(a), np.float32(b)
        if a != a or b != b:
            return _CANONICAL_NAN
        if a == b:  # only +-0 differ here: -0 < +0
            return b if np.signbit(a) else a
        return a if a > b else b

    def shfl_xor_sync(mask, value, lane_mask):
        lane, slots, lanes = _exchange(mask, value)
        src = lane ^ lane_mask
        return slots[src] if src < lanes else value

    def shfl_sync(mask, value, src_lane):
        _, slots, lanes = _exchange(mask, value)
        return slots[src_lane % lanes]

    def _mma_16816(unpack, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        lane, slots, lanes = _exchange(FULL_MASK, (a0, a1, a2, a3, b0, b1))
        if lanes != WARP_SIZE:
            raise RuntimeError("mma.sync needs a full warp of 32 lanes")
        a = np.zeros((16, 16), np.float32)
        b = np.zeros((16, 8), np.float32)
        for src in range(WARP_SIZE):
            g, t = src >> 2, src & 3
            fa0, fa1, fa2, fa3, fb0, fb1 = slots[src]
            a[g, 2 * t : 2 * t + 2] = unpack(fa0)
            a[g + 8, 2 * t : 2 * t + 2] = unpack(fa1)
            a[g, 2 * t + 8 : 2 * t + 10] = unpack(fa2)
            a[g + 8, 2 * t + 8 : 2 * t + 10] = unpack(fa3)
            b[2 * t : 2 * t + 2, g] = unpack(fb0)
            b[2 * t + 8 : 2 * t + 10, g] = unpack(fb1)
        g, t = lane >> 2, lane & 3
        rows = a[[g, g, g + 8, g + 8]]
        cols = b[:, [2 * t, 2 * t + 1, 2 * t, 2 * t + 1]]
        prod = np.einsum("ik,ki->i", rows.astype(np.float32), cols.astype(np.float32), dtype=np.float32)
        c = np.array([c0, c1, c2, c3], dtype=np.float32)
        d = prod + c
        return np.float32(d[0]), np.float32(d[1]), np.float32(d[2]), np.float32(d[3])

    def mma_f16_16816(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _mma_16816(unpack_f16x2, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    def mma_bf16_16816(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return _mma_16816(unpack_bf16x2, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

else:
    from ._ptx import (  # noqa: F401  (re-exported)
        bits_to_f32,
        cp_async_16,
        cp_async_commit,
        cp_async_wait_group,
        ex2,
        f32_to_bits,
        max_nan,
        load_16b,
        ldmatrix_x4,
        ldmatrix_x4_trans,
        load_shared_16b,
        mma_bf16_16816,
        mma_f16_16816,
        pack_bf16x2,
        pack_f16x2,
        unpack_bf16x2,
        unpack_f16x2,
    )

    shfl_xor_sync = cuda.shfl_xor_sync
    shfl_sync = cuda.shfl_sync


# ---- composed helpers: one source for both ------------------------------------------------------


@cuda.jit(device=True, inline="always")
def warp_sum(value, width):
    """Sum of ``value`` over each aligned group of ``width`` lanes (a power of two <= 32)."""
    offset = width >> 1
    while offset > 0:
        value += shfl_xor_sync(FULL_MASK, value, offset)
        offset >>= 1
    return value


@cuda.jit(device=True, inline="always")
def warp_max(value, width):
    """Maximum of ``value`` over each aligned group of ``width`` lanes (a power of two <= 32)."""
    offset = width >> 1
    while offset > 0:
        value = max(value, shfl_xor_sync(FULL_MASK, value, offset))
        offset >>= 1
    return value


@cuda.jit(device=True, inline="always")
def load_row8(words, w0, kind, dst):
    """Load 8 consecutive elements starting at word ``w0`` of a word view; widen into ``dst[0:8]``.

    fp16/bf16: one 16-byte load (w0 % 4 == 0); fp32: two (w0 % 8 == 0)."""
    if kind == F32:
        v = load_16b(words, w0)
        dst[0] = bits_to_f32(v[0])
        dst[1] = bits_to_f32(v[1])
        dst[2] = bits_to_f32(v[2])
        dst[3] = bits_to_f32(v[3])
        v = load_16b(words, w0 + 4)
        dst[4] = bits_to_f32(v[0])
        dst[5] = bits_to_f32(v[1])
        dst[6] = bits_to_f32(v[2])
        dst[7] = bits_to_f32(v[3])
    else:
        v = load_16b(words, w0)
        if kind == F16:
            dst[0], dst[1] = unpack_f16x2(v[0])
            dst[2], dst[3] = unpack_f16x2(v[1])
            dst[4], dst[5] = unpack_f16x2(v[2])
            dst[6], dst[7] = unpack_f16x2(v[3])
        else:
            dst[0], dst[1] = unpack_bf16x2(v[0])
            dst[2], dst[3] = unpack_bf16x2(v[1])
            dst[4], dst[5] = unpack_bf16x2(v[2])
            dst[6], dst[7] = unpack_bf16x2(v[3])


@cuda.jit(device=True, inline="always")
def load_shared_row8(words, w0, kind, dst):
    """Widen 8 consecutive elements starting at word ``w0`` (16-byte aligned) of a shared word array
    into ``dst[0:8]``: one ld.shared.v4 for fp16/bf16, two for fp32."""
    v = load_shared_16b(words, w0)
    if kind == F32:
        dst[0] = bits_to_f32(v[0])
        dst[1] = bits_to_f32(v[1])
        dst[2] = bits_to_f32(v[2])
        dst[3] = bits_to_f32(v[3])
        v = load_shared_16b(words, w0 + 4)
        dst[4] = bits_to_f32(v[0])
        dst[5] = bits_to_f32(v[1])
        dst[6] = bits_to_f32(v[2])
        dst[7] = bits_to_f32(v[3])
    elif kind == F16:
        dst[0], dst[1] = unpack_f16x2(v[0])
        dst[2], dst[3] = unpack_f16x2(v[1])
        dst[4], dst[5] = unpack_f16x2(v[2])
        dst[6], dst[7] = unpack_f16x2(v[3])
    else:
        dst[0], dst[1] = unpack_bf16x2(v[0])
        dst[2], dst[3] = unpack_bf16x2(v[1])
        dst[4], dst[5] = unpack_bf16x2(v[2])
        dst[6], dst[7] = unpack_bf16x2(v[3])


@cuda.jit(device=True, inline="always")
def store_row8(words, w0, kind, src):
    """Narrow ``src[0:8]`` (fp32) to ``kind`` and store at word ``w0`` of a word view."""
    if kind == F32:
        for k in range(8):
            words[w0 + k] = f32_to_bits(src[k])
    elif kind == F16:
        for k in range(4):
            words[w0 + k] = pack_f16x2(src[2 * k], src[2 * k + 1])
    else:
        for k in range(4):
            words[w0 + k] = pack_bf16x2(src[2 * k], src[2 * k + 1])


def words_per_row8(kind: int) -> int:
    """int32 words holding 8 elements of ``kind``."""
    return 8 if kind == F32 else 4


__all__ = [
    "FULL_MASK",
    "WARP_SIZE",
    "F16",
    "BF16",
    "F32",
    "DTYPE_CODES",
    "load_16b",
    "unpack_f16x2",
    "unpack_bf16x2",
    "pack_f16x2",
    "pack_bf16x2",
    "bits_to_f32",
    "f32_to_bits",
    "ex2",
    "max_nan",
    "shfl_xor_sync",
    "shfl_sync",
    "mma_f16_16816",
    "mma_bf16_16816",
    "cp_async_16",
    "cp_async_commit",
    "cp_async_wait_group",
    "ldmatrix_x4",
    "ldmatrix_x4_trans",
    "load_shared_16b",
    "load_shared_row8",
    "warp_sum",
    "warp_max",
    "load_row8",
    "store_row8",
    "words_per_row8",
]
