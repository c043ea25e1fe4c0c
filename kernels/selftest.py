"""Small kernels that run each primitive once, and ``run_selfcheck`` comparing them with numpy.

The ``run_*`` functions launch one kernel on the tensors' device (CPU tensors under the simulator,
CUDA tensors on a GPU) and return the outputs; the tests feed them edge cases, ``run_selfcheck``
random data. ``gpu_compile_specs`` lists the same kernels for the driverless compile check.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from numba import float32, int32

from tilegraph._device import SIMULATOR, cuda, resolve_device

from .compile_spec import CompileSpec
from .launch import launch
from .hooks import DTYPE_NAMES
from .primitives import (
    BF16,
    F16,
    F32,
    FULL_MASK,
    bits_to_f32,
    cp_async_16,
    cp_async_commit,
    cp_async_wait_group,
    ex2,
    max_nan,
    f32_to_bits,
    ldmatrix_x4,
    ldmatrix_x4_trans,
    load_16b,
    load_row8,
    mma_bf16_16816,
    mma_f16_16816,
    pack_bf16x2,
    pack_f16x2,
    shfl_sync,
    shfl_xor_sync,
    store_row8,
    unpack_bf16x2,
    unpack_f16x2,
    warp_max,
    warp_sum,
    words_per_row8,
)

REDUCE_WIDTHS = (2, 4, 8, 16, 32)
KIND_NAMES = DTYPE_NAMES
I32, F32A = "int32[::1]", "float32[::1]"


# ---- kernels (plain functions: cuda.jit them to launch, compile_ptx them to check) -------------


def unpack_kernel(words, out):
    """out[4i:4i+4] = unpack_f16x2(words[i]) + unpack_bf16x2(words[i])."""
    i = cuda.grid(1)
    a, b = unpack_f16x2(words[i])
    c, d = unpack_bf16x2(words[i])
    out[4 * i] = a
    out[4 * i + 1] = b
    out[4 * i + 2] = c
    out[4 * i + 3] = d


def pack_kernel(bits, out, n):
    """Pair i = fp32 bit patterns bits[2i], bits[2i+1]: out[i] f16x2, out[n+i] bf16x2, out[2n+2i..] bits."""
    i = cuda.grid(1)
    lo = bits_to_f32(bits[2 * i])
    hi = bits_to_f32(bits[2 * i + 1])
    out[i] = pack_f16x2(lo, hi)
    out[n + i] = pack_bf16x2(lo, hi)
    out[2 * n + 2 * i] = f32_to_bits(lo)
    out[2 * n + 2 * i + 1] = f32_to_bits(hi)


def ex2_kernel(x, out):
    i = cuda.grid(1)
    out[i] = ex2(x[i])


def max_nan_kernel(a, b, out):
    i = cuda.grid(1)
    out[i] = max_nan(a[i], b[i])


def shuffle_kernel(x, src_lane, xor_mask, out, n):
    """out[i] = shfl_xor_sync(x, xor_mask); out[n+i] = shfl_sync(x, src_lane[i])."""
    i = cuda.grid(1)
    out[i] = shfl_xor_sync(FULL_MASK, x[i], xor_mask)
    out[n + i] = shfl_sync(FULL_MASK, x[i], src_lane[i])


def reduce_kernel(x, max_width, out, n):
    """Row 2k / 2k+1 of out[10, n]: warp_sum / warp_max over width 2**(k+1), for widths <= max_width."""
    i = cuda.grid(1)
    width = 2
    row = 0
    while width <= max_width:
        out[row * n + i] = warp_sum(x[i], width)
        out[(row + 1) * n + i] = warp_max(x[i], width)
        width <<= 1
        row += 2


def load16_kernel(words, offset, out):
    """out[4i:4i+4] = load_16b(words, offset + 4i)."""
    i = cuda.grid(1)
    v = load_16b(words, offset + 4 * i)
    out[4 * i] = v[0]
    out[4 * i + 1] = v[1]
    out[4 * i + 2] = v[2]
    out[4 * i + 3] = v[3]


def make_row8_kernel(kind: int) -> Callable[..., Any]:
    """Thread i: load_row8 of row i of ``src`` into widened[8i:8i+8], store_row8 it to ``dst``."""
    KIND = kind
    WORDS = words_per_row8(kind)

    def row8_kernel(src, dst, widened):
        i = cuda.grid(1)
        buf = cuda.local.array(8, float32)
        load_row8(src, i * WORDS, KIND, buf)
        for k in range(8):
            widened[8 * i + k] = buf[k]
        store_row8(dst, i * WORDS, KIND, buf)

    return row8_kernel


def make_mma_kernel(kind: int) -> Callable[..., Any]:
    """One warp: lane l passes a_words[4l:4l+4], b_words[2l:2l+2], c[4l:4l+4]; d[4l:4l+4] = result."""
    mma = mma_f16_16816 if kind == F16 else mma_bf16_16816

    def mma_kernel(a_words, b_words, c, d):
        lane = cuda.threadIdx.x
        r = mma(
            a_words[4 * lane], a_words[4 * lane + 1], a_words[4 * lane + 2], a_words[4 * lane + 3],
            b_words[2 * lane], b_words[2 * lane + 1],
            c[4 * lane], c[4 * lane + 1], c[4 * lane + 2], c[4 * lane + 3],
        )  # fmt: skip
        d[4 * lane] = r[0]
        d[4 * lane + 1] = r[1]
        d[4 * lane + 2] = r[2]
        d[4 * lane + 3] = r[3]

    return mma_kernel


def make_ldmatrix_kernel(trans: bool) -> Callable[..., Any]:
    """One warp: lane l copies src[4l:4l+4] (16 bytes) into shared row l, a barrier, then
    ldmatrix_x4(_trans) with lane l giving shared row ``row_of_lane[l]``; out[4l:4l+4] = its words."""
    load, SIM = (ldmatrix_x4_trans if trans else ldmatrix_x4), SIMULATOR

    def ldmatrix_kernel(src, row_of_lane, out):
        lane = cuda.threadIdx.x
        if SIM:
            sh = cuda.shared.array(128, int32)
        else:
            sh = cuda.shared.array(128, int32, alignment=16)
        for w in range(4):
            sh[4 * lane + w] = src[4 * lane + w]
        cuda.syncthreads()
        r = load(sh, 4 * row_of_lane[lane])
        for m in range(4):
            out[4 * lane + m] = r[m]

    return ldmatrix_kernel


#: cp.async self-test modes: which waits run after the two commit groups (A then B)
CP_ASYNC_WAITS = ("all", "first", "none")  # wait_group 0 / wait_group 1 (A only) / no wait (a bug)


def make_cp_async_kernel(waits: str, block: int) -> Callable[..., Any]:
    """One block of ``block`` threads; thread i poisons its two shared slots (-1), then copies group A
    (src[4i:4i+4], zero-filled when i % 3 == 0) and group B (src[4*block + 4i:+4]) by cp.async, runs
    the ``waits`` mode, a barrier, and writes its NEIGHBOUR's slots (i + 1) % block to out[A | B]."""
    if waits not in CP_ASYNC_WAITS:
        raise ValueError(f"waits={waits!r}: one of {CP_ASYNC_WAITS}")
    WAIT_ALL, WAIT_FIRST, B, SIM, WORDS = waits == "all", waits == "first", block, SIMULATOR, 8 * block
    wait_0, wait_1 = cp_async_wait_group(0), cp_async_wait_group(1)

    def cp_async_kernel(src, out):
        i = cuda.threadIdx.x
        if SIM:
            sh = cuda.shared.array(WORDS, int32)
        else:
            sh = cuda.shared.array(WORDS, int32, alignment=16)
        for w in range(4):
            sh[4 * i + w] = -1
            sh[4 * B + 4 * i + w] = -1
        cuda.syncthreads()
        cp_async_16(sh, 4 * i, src, 4 * i, i % 3 != 0)
        cp_async_commit()
        cp_async_16(sh, 4 * B + 4 * i, src, 4 * B + 4 * i, True)
        cp_async_commit()
        if WAIT_ALL:
            wait_0()
        if WAIT_FIRST:
            wait_1()
        cuda.syncthreads()
        j = (i + 1) % B
        for w in range(4):
            out[4 * i + w] = sh[4 * j + w]
            out[4 * B + 4 * i + w] = sh[4 * B + 4 * j + w]

    return cp_async_kernel


_PLAIN = {
    "unpack": unpack_kernel,
    "pack": pack_kernel,
    "ex2": ex2_kernel,
    "max_nan": max_nan_kernel,
    "shuffle": shuffle_kernel,
    "reduce": reduce_kernel,
    "load16": load16_kernel,
}


@lru_cache(maxsize=None)
def _jitted(name: str, kind: int = -1) -> Any:
    if name == "row8":
        return cuda.jit(make_row8_kernel(kind))
    if name == "mma":
        return cuda.jit(make_mma_kernel(kind))
    if name == "ldmatrix":
        return cuda.jit(make_ldmatrix_kernel(bool(kind)))
    if name.startswith("cp_async."):
        _, waits, block = name.split(".")
        return cuda.jit(make_cp_async_kernel(waits, int(block)))
    return cuda.jit(_PLAIN[name])


def _launch(name: str, kernel: Any, threads: int, block: int, args: tuple) -> None:
    if threads % block:
        raise ValueError(f"{name}: {threads} threads is not a multiple of the block size {block}")
    launch(f"selftest.{name}", kernel, (threads // block,), (block,), args)


# ---- runners: launch on the inputs' device, return outputs ----------------------------------------


def run_unpack(words: torch.Tensor, block: int = 32) -> torch.Tensor:
    """int32 [n] -> float32 [n, 4]: (f16 lo, f16 hi, bf16 lo, bf16 hi) of each word."""
    out = torch.full((words.numel() * 4,), float("nan"), dtype=torch.float32, device=words.device)
    _launch("unpack", _jitted("unpack"), words.numel(), block, (words, out))
    return out.view(-1, 4)


def run_pack(values: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 [2n] -> (f16x2 words [n], bf16x2 words [n], fp32 bit patterns [2n]) via the primitives."""
    n = values.numel() // 2
    out = torch.zeros(4 * n, dtype=torch.int32, device=values.device)
    _launch("pack", _jitted("pack"), n, block, (values.contiguous().view(torch.int32), out, n))
    return out[:n], out[n : 2 * n], out[2 * n :]


def run_ex2(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    out = torch.full_like(x, float("nan"))
    _launch("ex2", _jitted("ex2"), x.numel(), block, (x, out))
    return out


def run_max_nan(a: torch.Tensor, b: torch.Tensor, block: int = 32) -> torch.Tensor:
    out = torch.full_like(a, 7.0)
    _launch("max_nan", _jitted("max_nan"), a.numel(), block, (a, b, out))
    return out


def run_shuffle(
    x: torch.Tensor, src_lane: torch.Tensor, xor_mask: int, block: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shfl_xor_sync(x, xor_mask), shfl_sync(x, src_lane)) for every thread."""
    n = x.numel()
    out = torch.full((2 * n,), float("nan"), dtype=torch.float32, device=x.device)
    _launch("shuffle", _jitted("shuffle"), n, block, (x, src_lane, xor_mask, out, n))
    return out[:n], out[n:]


def run_reduce(x: torch.Tensor, max_width: int = 32, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, maxes), each [len(REDUCE_WIDTHS), n]; rows of widths above max_width stay NaN."""
    n = x.numel()
    out = torch.full((2 * len(REDUCE_WIDTHS) * n,), float("nan"), dtype=torch.float32, device=x.device)
    _launch("reduce", _jitted("reduce"), n, block, (x, max_width, out, n))
    rows = out.view(len(REDUCE_WIDTHS), 2, n)
    return rows[:, 0], rows[:, 1]


def run_load16(words: torch.Tensor, offset: int, threads: int, block: int = 32) -> torch.Tensor:
    out = torch.zeros(4 * threads, dtype=torch.int32, device=words.device)
    _launch("load16", _jitted("load16"), threads, block, (words, offset, out))
    return out


def run_row8(kind: int, src_words: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 8 ``kind`` elements (as int32 words) -> (widened float32 [rows, 8], stored words)."""
    rows = src_words.numel() // words_per_row8(kind)
    widened = torch.full((rows * 8,), float("nan"), dtype=torch.float32, device=src_words.device)
    dst = torch.zeros_like(src_words)
    _launch("row8", _jitted("row8", kind), rows, min(block, rows), (src_words, dst, widened))
    return widened.view(rows, 8), dst


def run_mma(
    kind: int, a_words: torch.Tensor, b_words: torch.Tensor, c: torch.Tensor, lanes: int = 32
) -> torch.Tensor:
    """One warp: per-lane fragments a_words [32, 4], b_words [32, 2], c [32, 4] -> d [32, 4].
    (``lanes`` < 32 only to test the simulator's full-warp check: undefined behaviour on a GPU.)"""
    d = torch.full((32 * 4,), float("nan"), dtype=torch.float32, device=c.device)
    args = (a_words.reshape(-1), b_words.reshape(-1), c.reshape(-1), d)
    _launch("mma", _jitted("mma", kind), lanes, lanes, args)
    return d.view(32, 4)


def run_ldmatrix(src: torch.Tensor, row_of_lane: torch.Tensor, trans: bool, lanes: int = 32) -> torch.Tensor:
    """int32 src [32, 4] (32 rows of 8 b16 halves), int32 row_of_lane [32] -> the lanes' ldmatrix
    words [32, 4] (``lanes`` < 32 only to test the simulator's full-warp check)."""
    out = torch.zeros(32 * 4, dtype=torch.int32, device=src.device)
    _launch(f"ldmatrix{'.trans' if trans else ''}", _jitted("ldmatrix", int(trans)), lanes, lanes, (src.reshape(-1), row_of_lane, out))
    return out.view(32, 4)


def ldmatrix_expected(src: np.ndarray, row_of_lane: np.ndarray, trans: bool) -> np.ndarray:
    """What ``run_ldmatrix`` returns (PTX ISA, ldmatrix m8n8.x4 .b16): matrix m's row j is shared row
    row_of_lane[8m + j]; lane l's word m holds elements (l // 4, 2(l % 4) + h) of matrix m, h = 0, 1
    in the low / high half; with .trans elements (2(l % 4) + h, l // 4)."""
    halves = src.view(np.uint32)
    halves = np.stack([halves & 0xFFFF, halves >> 16], axis=-1).reshape(32, 8)
    mats = halves[row_of_lane].reshape(4, 8, 8)
    if trans:
        mats = mats.transpose(0, 2, 1)
    out = np.zeros((32, 4), np.uint32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for m in range(4):
            out[lane, m] = mats[m, g, 2 * t] | (mats[m, g, 2 * t + 1] << 16)
    return out.view(np.int32)


def run_cp_async(src: torch.Tensor, waits: str = "all", block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 src [8 * block] -> (group A words [block, 4], group B words [block, 4]) as thread i saw
    its neighbour's slots after ``waits`` (see make_cp_async_kernel; -1 or, in the simulator,
    the emulation's PENDING word = a copy that had not landed)."""
    out = torch.zeros(8 * block, dtype=torch.int32, device=src.device)
    launch(f"selftest.cp_async.{waits}", _jitted(f"cp_async.{waits}.{block}"), (1,), (block,), (src, out))
    return out[: 4 * block].view(block, 4), out[4 * block :].view(block, 4)


def cp_async_expected(src: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``run_cp_async(src, "all")`` returns: neighbour j = (i + 1) % block, A zero-filled where j % 3 == 0."""
    j = (np.arange(block) + 1) % block
    a = src[: 4 * block].reshape(block, 4)[j].copy()
    a[j % 3 == 0] = 0
    return a, src[4 * block :].reshape(block, 4)[j]


# ---- numpy side: references and the m16n8k16 fragment layout (PTX ISA) --------------------------


def half_bits(x: np.ndarray, kind: int) -> np.ndarray:
    """float32 -> uint16 bit patterns of fp16 / bf16, rounded to nearest even (torch's conversion)."""
    dtype = torch.float16 if kind == F16 else torch.bfloat16
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dtype)
    return t.view(torch.int16).numpy().view(np.uint16)


def half_values(bits: np.ndarray, kind: int) -> np.ndarray:
    """uint16 fp16 / bf16 bit patterns -> float32 values."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    if kind == F16:
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def pair_words(bits: np.ndarray) -> np.ndarray:
    """uint16 [..., 2k] -> int32 [..., k]: element 2j in the low half of word j."""
    b = bits.astype(np.uint32)
    return (b[..., 0::2] | (b[..., 1::2] << 16)).view(np.int32)


def mma_fragments(a_bits: np.ndarray, b_bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint16 A [16, 16] (row) and B [16, 8] (col) -> per-lane words a [32, 4], b [32, 2].

    PTX ISA, mma.m16n8k16 .f16/.bf16: groupID = lane >> 2, tig = lane % 4; element i of a lane's
    fragment sits in register i // 2, half i % 2 (lower index in the low bits).
    A element i (0..7): row groupID (+8 for i in 2,3,6,7), col 2*tig + (i & 1) (+8 for i >= 4).
    B element i (0..3): row 2*tig + (i & 1) (+8 for i >= 2), col groupID."""
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(8):
            row = g + 8 * ((i >> 1) & 1)
            col = 2 * t + (i & 1) + 8 * (i >> 2)
            a[lane, i >> 1] |= np.uint32(a_bits[row, col]) << np.uint32(16 * (i & 1))
        for i in range(4):
            row = 2 * t + (i & 1) + 8 * (i >> 1)
            b[lane, i >> 1] |= np.uint32(b_bits[row, g]) << np.uint32(16 * (i & 1))
    return a.view(np.int32), b.view(np.int32)


def mma_accumulator_index() -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) [32, 4] of C/D element i of each lane: row groupID (+8 for i >= 2), col 2*tig + (i & 1)."""
    lane = np.arange(32)[:, None]
    i = np.arange(4)[None, :]
    return (lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)


# ---- the self-check ---------------------------------------------------------------------------------


Check = tuple[str, bool, str]


def _max_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))


def _check_convert(dev: torch.device, rng: np.random.Generator) -> list[Check]:
    values = (rng.standard_normal(128) * 4.0).astype(np.float32)
    values[:4] = [1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]  # ties
    f16_w, bf16_w, bits = (t.cpu().numpy() for t in run_pack(torch.from_numpy(values).to(dev)))
    ok_f16 = np.array_equal(f16_w, pair_words(half_bits(values, F16)))
    ok_bf16 = np.array_equal(bf16_w, pair_words(half_bits(values, BF16)))
    ok_bits = np.array_equal(bits, values.view(np.int32))
    words = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32)
    words &= np.uint32(0xBFFFBFFF)  # clear each half's top exponent bit: finite fp16 and bf16
    got = run_unpack(torch.from_numpy(words.view(np.int32)).to(dev)).cpu().numpy()
    halves = np.stack([words & 0xFFFF, words >> 16], axis=1).astype(np.uint16)
    want = np.concatenate([half_values(halves, F16), half_values(halves, BF16)], axis=1)
    return [
        ("pack_f16x2 (round to nearest even)", ok_f16, "bit-exact vs torch fp16 conversion"),
        ("pack_bf16x2 (round to nearest even)", ok_bf16, "bit-exact vs torch bf16 conversion"),
        ("bits_to_f32 / f32_to_bits", ok_bits, "round trip of 128 values"),
        ("unpack_f16x2 / unpack_bf16x2", np.array_equal(got, want), f"max err {_max_err(got, want):.3g}"),
    ]


def _check_load16(dev: torch.device, rng: np.random.Generator) -> list[Check]:
    words = rng.integers(-(2**31), 2**31, 132, dtype=np.int64).astype(np.int32)
    got = run_load16(torch.from_numpy(words).to(dev), 4, 32).cpu().numpy()
    return [("load_16b", np.array_equal(got, words[4:]), "32 lanes x 16 bytes at word offset 4")]


def _check_ex2(dev: torch.device, rng: np.random.Generator) -> list[Check]:
    x = rng.uniform(-100.0, 100.0, 64).astype(np.float32)
    got = run_ex2(torch.from_numpy(x).to(dev)).cpu().numpy()
    rel = float(np.max(np.abs(got / np.exp2(x.astype(np.float64)) - 1.0)))
    return [("ex2", rel < 2.0**-20, f"max rel err {rel:.2e} (bound 2^-20)")]


def _check_shuffles(dev: torch.device, rng: np.random.Generator) -> list[Check]:
    n = 64
    x = rng.standard_normal(n).astype(np.float32)
    src = rng.integers(0, 32, n).astype(np.int32)
    xor_out, idx_out = (t.cpu().numpy() for t in run_shuffle(*(torch.from_numpy(a).to(dev) for a in (x, src)), 5))
    lanes = np.arange(n)
    base = lanes & ~31
    ok_xor = np.array_equal(xor_out, x[base + ((lanes & 31) ^ 5)])
    ok_idx = np.array_equal(idx_out, x[base + src])
    sums, maxes = (t.cpu().numpy() for t in run_reduce(torch.from_numpy(x).to(dev)))
    errs = []
    for k, width in enumerate(REDUCE_WIDTHS):
        groups = x.reshape(-1, width).astype(np.float64)
        errs.append(_max_err(sums[k], np.repeat(groups.sum(1), width)))
        errs.append(0.0 if np.array_equal(maxes[k], np.repeat(x.reshape(-1, width).max(1), width)) else np.inf)
    err = max(errs)
    return [
        ("shfl_xor_sync", ok_xor, "2 warps, lane ^ 5"),
        ("shfl_sync", ok_idx, "2 warps, random source lanes"),
        ("warp_sum / warp_max", err < 1e-5, f"widths 2..32, 2 warps, max err {err:.2e}"),
    ]


def _check_row8(dev: torch.device, rng: np.random.Generator) -> list[Check]:
    checks = []
    for kind in (F16, BF16, F32):
        values = rng.standard_normal((32, 8)).astype(np.float32)
        if kind == F32:
            words = values.view(np.int32).reshape(-1)
        else:
            values = half_values(half_bits(values, kind), kind)
            words = pair_words(half_bits(values, kind)).reshape(-1)
        widened, stored = run_row8(kind, torch.from_numpy(words.copy()).to(dev))
        ok = np.array_equal(widened.cpu().numpy(), values) and np.array_equal(stored.cpu().numpy(), words)
        checks.append((f"load_row8 / store_row8 [{KIND_NAMES[kind]}]", ok, "32 rows, widen and narrow back"))
    return checks


def _check_mma(dev: torch.device, rng: np.random.Generator) -> list[Check]:
    checks = []
    rows, cols = mma_accumulator_index()
    for kind in (F16, BF16):
        a_bits = half_bits(rng.standard_normal((16, 16)), kind)
        b_bits = half_bits(rng.standard_normal((16, 8)), kind)
        c = rng.standard_normal((16, 8)).astype(np.float32)
        a_words, b_words = mma_fragments(a_bits, b_bits)
        args = (torch.from_numpy(t).to(dev) for t in (a_words, b_words, np.ascontiguousarray(c[rows, cols])))
        d = run_mma(kind, *args).cpu().numpy()
        want = half_values(a_bits, kind).astype(np.float64) @ half_values(b_bits, kind) + c
        err = _max_err(d, want[rows, cols])
        name = "mma_f16_16816" if kind == F16 else "mma_bf16_16816"
        checks.append((name, err < 1e-4, f"one warp, D = A @ B + C, max err {err:.2e}"))
    return checks


def _check_ldmatrix(dev: torch.device, rng: np.random.Generator) -> list[Check]:
    checks = []
    src = rng.integers(-(2**31), 2**31, (32, 4), dtype=np.int64).astype(np.int32)
    rows = rng.permutation(32).astype(np.int32)
    for trans in (False, True):
        got = run_ldmatrix(torch.from_numpy(src).to(dev), torch.from_numpy(rows).to(dev), trans).cpu().numpy()
        ok = np.array_equal(got, ldmatrix_expected(src, rows, trans))
        checks.append((f"ldmatrix_x4{'_trans' if trans else ''}", ok, "one warp, rows in a random order"))
    return checks


def _check_cp_async(dev: torch.device, rng: np.random.Generator) -> list[Check]:
    block = 32
    src = rng.integers(-(2**31), 2**31, 8 * block, dtype=np.int64).astype(np.int32)
    got_a, got_b = (t.cpu().numpy() for t in run_cp_async(torch.from_numpy(src).to(dev), "all", block))
    want_a, want_b = cp_async_expected(src, block)
    ok = np.array_equal(got_a, want_a) and np.array_equal(got_b, want_b)
    return [("cp_async_16 / commit / wait_group", ok, "32 lanes, 2 groups, zero-fill every 3rd, read by a neighbour")]


def run_selfcheck(device: str | torch.device | None = None) -> list[Check]:
    """Launch every primitive's kernel once on ``device``; (name, ok, detail) per check."""
    dev = resolve_device(device)
    rng = np.random.default_rng(2024)
    results: list[Check] = []
    for part in (_check_convert, _check_load16, _check_ex2, _check_shuffles, _check_row8, _check_mma, _check_ldmatrix, _check_cp_async):
        try:
            results.extend(part(dev, rng))
        except Exception as exc:  # a crashing primitive is a failed check, not a crashed self-check
            results.append((part.__name__.removeprefix("_check_"), False, f"{type(exc).__name__}: {exc}"))
    return results


# ---- the driverless compile check -------------------------------------------------------------------


def gpu_compile_specs() -> list[CompileSpec]:
    """Every self-test kernel; row8 for each dtype code, mma for f16 and bf16."""
    specs = [
        CompileSpec("selftest.unpack", unpack_kernel, f"void({I32}, {F32A})", ("cvt.f32.f16", "shl.b32")),
        CompileSpec(
            "selftest.pack",
            pack_kernel,
            f"void({I32}, {I32}, int64)",
            ("cvt.rn.f16x2.f32", "cvt.rn.bf16x2.f32"),
        ),
        CompileSpec("selftest.ex2", ex2_kernel, f"void({F32A}, {F32A})", ("ex2.approx.ftz.f32",)),
        CompileSpec("selftest.max_nan", max_nan_kernel, f"void({F32A}, {F32A}, {F32A})", ("max.NaN.f32",)),
        CompileSpec(
            "selftest.shuffle",
            shuffle_kernel,
            f"void({F32A}, {I32}, int64, {F32A}, int64)",
            ("shfl.sync.bfly", "shfl.sync.idx"),
        ),
        CompileSpec("selftest.reduce", reduce_kernel, f"void({F32A}, int64, {F32A}, int64)", ("shfl.sync.bfly",)),
        CompileSpec("selftest.load16", load16_kernel, f"void({I32}, int64, {I32})", ("ld.global.nc.v4.u32",)),
    ]
    row8_expect = {F16: ("cvt.f32.f16", "cvt.rn.f16x2.f32"), BF16: ("cvt.rn.bf16x2.f32",), F32: ()}
    for kind in (F16, BF16, F32):
        expect = ("ld.global.nc.v4.u32", *row8_expect[kind])
        specs.append(
            CompileSpec(
                f"selftest.row8[{KIND_NAMES[kind]}]", make_row8_kernel(kind), f"void({I32}, {I32}, {F32A})", expect
            )
        )
    for kind in (F16, BF16):
        ab = "f16" if kind == F16 else "bf16"
        specs.append(
            CompileSpec(
                f"selftest.mma[{KIND_NAMES[kind]}]",
                make_mma_kernel(kind),
                f"void({I32}, {I32}, {F32A}, {F32A})",
                (f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32",),
            )
        )
    for trans in (False, True):
        specs.append(
            CompileSpec(
                f"selftest.ldmatrix[{'trans' if trans else 'plain'}]",
                make_ldmatrix_kernel(trans),
                f"void({I32}, {I32}, {I32})",
                (f"ldmatrix.sync.aligned.m8n8.x4{'.trans' if trans else ''}.shared.b16",),
            )
        )
    for waits in ("all", "first"):
        specs.append(
            CompileSpec(
                f"selftest.cp_async[{waits}]",
                make_cp_async_kernel(waits, 32),
                f"void({I32}, {I32})",
                ("cp.async.cg.shared.global", "cp.async.commit_group", f"cp.async.wait_group {0 if waits == 'all' else 1}"),
            )
        )
    return specs
