"""Variant hooks on the device side: signatures, re-jitting, composition, checking, fingerprints,
and the built-in hook implementations.

A user hook is a plain Python function (or a numba device function: its ``py_func`` is used). It
takes the base arguments of its kind (``HOOK_ARGS``) and then, optionally, one argument per
run-time parameter it reads, *named after the parameter*: each receives that parameter's offset
into the float32 ``params`` array (an int64 constant at compile time). So a per-head parameter
``slopes`` is read as ``params[slopes + qo_head]`` and a scalar ``cap`` as ``params[cap]``.

``compose`` re-jits hooks as ``inline="always"`` device functions (driverless compiles need that)
and chains several hooks of one kind into one device function, generated with the offsets baked
in: transforms run in order, logits transforms feed each other, masks are AND-ed.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
import types
from typing import Any, Callable, Sequence

import numba
import numpy as np
from numba import float32, int64
from numba.core import types as numba_types

from tilegraph._device import SIMULATOR, cuda, simulating

VEC_ARGS = ("vals", "dim0", "request", "head", "pos", "params")
PAIR_ARGS = ("vals", "partner", "dim0", "head_dim", "request", "head", "pos", "params")
HOOK_ARGS: dict[str, tuple[str, ...]] = {
    "query_transform": VEC_ARGS,
    "key_transform": VEC_ARGS,
    "output_transform": VEC_ARGS,
    "logits_transform": ("score", "request", "qo_pos", "kv_pos", "qo_head", "kv_head", "params"),
    "logits_mask": ("request", "qo_pos", "kv_pos", "qo_head", "kv_head", "params"),
    "query_pair_transform": PAIR_ARGS,
    "key_pair_transform": PAIR_ARGS,
    "sink": ("qo_head", "params"),
}
MASK_BITS_PER_WORD = 24  # custom-mask bits per float32 params word (integers < 2**24 are exact)

Hook = Callable[..., Any]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class HookError(Exception):
    """A hook is unusable; the message names it (runtime/variants.py turns it into a VariantError)."""


def py_function(hook: Any) -> types.FunctionType:
    """The plain Python function behind a hook (a numba device function's ``py_func``)."""
    fn = getattr(hook, "py_func", hook)
    if not isinstance(fn, types.FunctionType):
        raise HookError(f"is a {type(hook).__name__}, not a Python function or a numba device function")
    return fn


def param_arguments(kind: str, hook: Any) -> tuple[str, ...]:
    """The names of the run-time parameters ``hook`` reads (its arguments after the base ones)."""
    fn = py_function(hook)
    sig = inspect.signature(fn)
    base = HOOK_ARGS[kind]
    names = []
    for p in sig.parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty:
            raise HookError(f"argument {p.name!r} must be a plain positional argument (no *args, **kwargs or defaults)")
        names.append(p.name)
    if len(names) < len(base):
        raise HookError(f"takes {len(names)} arguments, a {kind} hook takes ({', '.join(base)}[, <param offsets>...])")
    return tuple(names[len(base) :])


def rejit(hook: Any) -> Any:
    """``hook`` as an inline="always" device function (a fresh dispatcher)."""
    return cuda.jit(device=True, inline="always")(py_function(hook))


def compose(kind: str, parts: Sequence[tuple[Any, tuple[int, ...]]], tag: str = "", cast: bool = True) -> Any:
    """One inline device function of ``kind`` calling each (hook, param offsets) of ``parts`` in order
    (``cast``: float32() around logits and sink results)."""
    args = ", ".join(HOOK_ARGS[kind])
    env: dict[str, Any] = {"float32": float32 if cast else _no_cast}
    calls = []
    for i, (hook, offsets) in enumerate(parts):
        env[f"h{i}"] = rejit(hook)
        calls.append(f"h{i}({args}{''.join(f', {int(o)}' for o in offsets)})")
    name = f"{kind}_{tag}" if tag.isidentifier() else kind
    if kind == "logits_transform":
        body = [f"    score = float32({c})" for c in calls] + ["    return score"]
    elif kind == "logits_mask":
        body = ["    return " + " and ".join(calls)]
    elif kind == "sink":
        if len(parts) != 1:
            raise HookError("a variant has at most one sink hook")
        body = [f"    return float32({calls[0]})"]
    else:
        body = [f"    {c}" for c in calls] + ["    return"]
    source = f"def {name}({args}):\n" + "\n".join(body) + "\n"
    code = compile(source, f"<tilegraph variant hook {name}>", "exec")
    exec(code, env)
    return cuda.jit(device=True, inline="always")(env[name])


def _no_cast(x: Any) -> Any:
    return x


# ---- checking a hook once, at Variant construction ---------------------------------------------


def _check_kernel(kind: str, dev: Any) -> Callable[..., Any]:
    """A one-thread kernel calling ``dev`` with sample arguments of the kernel's own types."""
    if kind in ("query_transform", "key_transform", "output_transform"):

        def check(params, out):
            vals = cuda.local.array(8, float32)
            for k in range(8):
                vals[k] = float32(k + 1)
            dev(vals, int64(0), int64(0), int64(1), int64(3), params)
            out[0] = vals[0]

    elif kind in ("query_pair_transform", "key_pair_transform"):

        def check(params, out):
            vals = cuda.local.array(8, float32)
            partner = cuda.local.array(8, float32)
            for k in range(8):
                vals[k] = float32(k + 1)
                partner[k] = float32(k - 1)
            dev(vals, partner, int64(8), int64(16), int64(0), int64(1), int64(3), params)
            out[0] = vals[0]

    elif kind == "logits_transform":

        def check(params, out):
            out[0] = dev(float32(0.25), int64(0), int64(5), int64(3), int64(1), int64(0), params)

    elif kind == "logits_mask":

        def check(params, out):
            out[0] = float32(1.0) if dev(int64(0), int64(5), int64(3), int64(1), int64(0), params) else float32(0.0)

    else:

        def check(params, out):
            out[0] = dev(int64(1), params)

    return check


def _device_signature(kind: str, num_offsets: int) -> tuple[Any, ...]:
    """The argument types the kernels call a ``kind`` hook with (offsets: int64 constants)."""
    arr, i64, f32 = numba_types.float32[::1], numba_types.int64, numba_types.float32
    base = {
        "logits_transform": (f32, *[i64] * 5, arr),
        "logits_mask": (*[i64] * 5, arr),
        "sink": (i64, arr),
        "query_pair_transform": (arr, arr, *[i64] * 5, arr),
        "key_pair_transform": (arr, arr, *[i64] * 5, arr),
    }.get(kind, (arr, *[i64] * 4, arr))
    return (*base, *[i64] * num_offsets)


def _typing_copy(fn: types.FunctionType, seen: dict[int, Any]) -> types.FunctionType:
    """``fn`` with every device function it reaches (globals and closure cells holding a numba or
    simulator dispatcher) replaced by an ``njit`` copy of its ``py_func``, recursively: what numba's
    nopython typing can check on a machine whose CUDA target is the simulator."""
    if id(fn) in seen:
        return seen[id(fn)]

    def swap(value: Any) -> Any:
        inner = getattr(value, "py_func", None)
        if isinstance(inner, types.FunctionType):
            return numba.njit(inline="always")(_typing_copy(inner, seen))
        return value

    names = _code_names(fn.__code__)
    new_globals = dict(fn.__globals__)
    for name in names:
        if name in new_globals:
            new_globals[name] = swap(new_globals[name])
    closure = tuple(types.CellType(swap(c.cell_contents)) for c in fn.__closure__ or ())
    copy = types.FunctionType(fn.__code__, new_globals, fn.__name__, fn.__defaults__, closure or None)
    seen[id(fn)] = copy
    return copy


_TYPE_CHECKED: dict[tuple[Any, ...], str | None] = {}


def type_check(kind: str, hook: Any, num_offsets: int) -> None:
    """Numba nopython typing of ``hook`` with the argument types the kernels call it with, in both
    modes (on the simulator hooks otherwise run as plain Python, which accepts anything): the CPU
    target's typing where the CUDA target is the simulator. A hook that uses ``numba.cuda`` itself
    (intrinsics, local arrays) is left to the simulated run. HookError naming the cause."""
    fn = py_function(hook)
    if "cuda" in _code_names(fn.__code__) and SIMULATOR:
        return
    names = sorted(_code_names(fn.__code__) & set(fn.__globals__))
    kinds = tuple((n, type(fn.__globals__[n]).__qualname__) for n in names)  # a helper's kind matters
    key = (kind, fingerprint(fn), num_offsets, kinds)
    if key not in _TYPE_CHECKED:
        error = None
        try:
            sig = _device_signature(kind, num_offsets)
            dispatcher = numba.njit(sig, cache=False, _nrt=False)(_typing_copy(fn, {}))  # no NRT: as on a GPU
            result = dispatcher.nopython_signatures[0].return_type
            if kind in ("logits_transform", "sink") and not isinstance(result, (numba_types.Number, numba_types.Boolean)):
                error = f"returns {result}, a {kind} hook must return a number"
            if kind == "logits_mask" and not isinstance(result, (numba_types.Number, numba_types.Boolean)):
                error = f"returns {result}, a logits_mask hook must return a bool"
        except Exception as exc:  # numba's typing errors
            lines = [line for line in _ANSI.sub("", str(exc)).strip().splitlines() if line.strip()]
            detail = "\n".join(lines[:14]) if lines else type(exc).__name__
            error = f"does not compile as a device function (numba typing, {type(exc).__name__}): {detail}"
        _TYPE_CHECKED[key] = error
    if _TYPE_CHECKED[key] is not None:
        raise HookError(_TYPE_CHECKED[key])


def check_hook(kind: str, hook: Any, offsets: tuple[int, ...], sample_params: np.ndarray) -> None:
    """GPU build: compile ``hook`` alone, then a tiny kernel calling it, for sm_80 (``compile_ptx``
    needs no driver). Simulator: numba's nopython typing of the hook (``type_check``), then that
    kernel run once on one thread. HookError with the cause."""
    if SIMULATOR:
        type_check(kind, hook, len(offsets))
    try:
        kernel = _check_kernel(kind, compose(kind, [(hook, offsets)], cast=not SIMULATOR))
        if SIMULATOR:
            out = np.full(1, np.nan, np.float32)
            with simulating():
                cuda.jit(kernel)[1, 1](sample_params.astype(np.float32), out)
            if kind in ("logits_transform", "sink") and np.isnan(out[0]):
                raise HookError("returned None or NaN for sample arguments (it must return a number)")
        else:
            sig = _device_signature(kind, len(offsets))
            cuda.compile_ptx(py_function(hook), sig, device=True, cc=(8, 0), fastmath=True)
            cuda.compile_ptx(kernel, "void(float32[::1], float32[::1])", cc=(8, 0), fastmath=True)
    except HookError:
        raise
    except Exception as exc:  # numba's typing/lowering errors, or the hook's own exception
        lines = [line for line in _ANSI.sub("", str(exc)).strip().splitlines() if line.strip()]
        detail = "\n".join(lines[:14]) if lines else type(exc).__name__
        raise HookError(f"does not compile as a device function ({type(exc).__name__}): {detail}") from exc


# ---- fingerprints: change whenever anything a hook draws on changes ------------------------------


def _feed_code(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(h, const)
        else:
            h.update(repr(const).encode())


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _feed_value(h: Any, value: Any, seen: set[int]) -> None:
    fn = getattr(value, "py_func", value)
    if isinstance(fn, types.FunctionType):
        _feed_function(h, fn, seen)
    elif isinstance(value, types.ModuleType):
        h.update(f"module:{value.__name__}".encode())
    elif isinstance(value, (int, float, str, bool, bytes, type(None))):
        h.update(repr(value).encode())
    elif isinstance(value, (tuple, list)):
        for item in value:
            _feed_value(h, item, seen)
    elif isinstance(value, np.ndarray):
        h.update(value.tobytes())
    else:
        h.update(f"{type(value).__module__}.{type(value).__qualname__}".encode())


def _feed_function(h: Any, fn: types.FunctionType, seen: set[int]) -> None:
    if id(fn) in seen:
        return
    seen.add(id(fn))
    h.update(f"{fn.__module__}.{fn.__qualname__}".encode())
    _feed_code(h, fn.__code__)
    for cell in fn.__closure__ or ():
        _feed_value(h, cell.cell_contents, seen)
    for name in sorted(_code_names(fn.__code__)):
        if name in fn.__globals__:
            h.update(name.encode())
            _feed_value(h, fn.__globals__[name], seen)


def fingerprint(*items: Any) -> str:
    """sha256 over hooks (bytecode, constants, closure contents and referenced globals, recursively)
    and plain values."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for item in items:
        _feed_value(h, item, seen)
    return h.hexdigest()


# ---- built-in hooks (their trailing arguments are parameter offsets) -----------------------------


def soft_cap_logits(score, request, qo_pos, kv_pos, qo_head, kv_head, params, logits_soft_cap):
    cap = params[logits_soft_cap]
    if cap == float32(0.0):  # FlashInfer's convention: 0 = no soft-cap
        return float32(score)
    return float32(cap * math.tanh(score / cap))


def sliding_window_mask(request, qo_pos, kv_pos, qo_head, kv_head, params, window_left):
    window = int64(params[window_left])
    return window < 0 or qo_pos - kv_pos <= window


def alibi_logits(score, request, qo_pos, kv_pos, qo_head, kv_head, params, alibi_slopes):
    return float32(score + params[alibi_slopes + qo_head] * float32(kv_pos - qo_pos))


def custom_mask_bits(request, qo_pos, kv_pos, qo_head, kv_head, params, mask_offset, mask_words):
    bit = int64(params[mask_offset + request]) + kv_pos
    word = int64(params[mask_words + bit // MASK_BITS_PER_WORD])
    return (word >> (bit % MASK_BITS_PER_WORD)) & 1 != 0


def custom_mask_rows(request, qo_pos, kv_pos, qo_head, kv_head, params, mask_offset, mask_q0, mask_stride, mask_words):
    """The custom mask with a row per query token: bit offset[r] + (qo_pos - q0[r]) * stride[r] + kv_pos
    (prefill: q0 = kv_len - qo_len, stride = kv_len; decode: one row, q0 = kv_len - 1)."""
    row = qo_pos - int64(params[mask_q0 + request])
    bit = int64(params[mask_offset + request]) + row * int64(params[mask_stride + request]) + kv_pos
    word = int64(params[mask_words + bit // MASK_BITS_PER_WORD])
    return (word >> (bit % MASK_BITS_PER_WORD)) & 1 != 0


def rope_llama(vals, partner, dim0, head_dim, request, head, pos, params, rope_theta, rope_scale):
    half = head_dim // 2
    log_theta = math.log(params[rope_theta])
    position = float32(pos) / params[rope_scale]
    for k in range(8):
        i = (dim0 + k) % half
        angle = float32(position * math.exp(float32(-2.0 * i / head_dim) * log_theta))
        c = float32(math.cos(angle))
        s = float32(math.sin(angle))
        if dim0 < half:
            vals[k] = vals[k] * c - partner[k] * s
        else:
            vals[k] = vals[k] * c + partner[k] * s


def sink_logit(qo_head, params, sinks):
    return params[sinks + qo_head]


def sigmoid_logits(score, request, qo_pos, kv_pos, qo_head, kv_head, params, sigmoid_bias):
    return float32(1.0 / (1.0 + math.exp(-(score + params[sigmoid_bias]))))
