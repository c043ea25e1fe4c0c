"""The ``Variant`` class: an attention variant's hooks, its run-time parameters and their place in
the fixed params buffer, compiled into kernel hooks (``tilegraph.variants`` has the module guide
and the built-in variants)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from tilegraph.errors import InputError
from tilegraph.kernels import variant_hooks as vh
from tilegraph.kernels.hooks import DEFAULT_HOOKS
from tilegraph.kernels.hooks import AttentionHooks as DecodeHooks

from .settings import Settings

ParamShape = Any  # "scalar" | "qo_head" | "request" | int | Callable[[Settings], int]


class VariantError(InputError):
    """A Variant is malformed: a hook's signature, a hook numba cannot compile, a parameter clash."""


@dataclass(frozen=True)
class Param:
    """A run-time parameter: ``shape`` as in the module doc; ``default`` a number, a sequence or a
    function of Settings returning one (None: required -- run() refuses until it is given)."""

    name: str
    shape: ParamShape = "scalar"
    default: Any = None
    #: optional value check: values (float32 array) -> None, or a message saying what is wrong
    check: Callable[[np.ndarray], str | None] | None = None

    def size(self, settings: Settings) -> int:
        shape = self.shape
        if shape == "scalar":
            return 1
        if shape == "qo_head":
            return settings.num_qo_heads
        if shape == "request":
            return settings.max_batch_size
        if callable(shape):
            return int(shape(settings))
        if isinstance(shape, bool) or not isinstance(shape, (int, np.integer)):
            raise VariantError(f"parameter {self.name!r}: shape {shape!r} is not 'scalar', 'qo_head', 'request', an int or a function of Settings")
        return int(shape)


@dataclass(frozen=True)
class ParamLayout:
    """Where each parameter lives in the float32 params buffer: name -> (offset, size)."""

    slots: tuple[tuple[str, int, int], ...]
    total: int  # buffer length (>= 1)

    def offset(self, name: str) -> int:
        return next(off for n, off, _ in self.slots if n == name)

    def size(self, name: str) -> int:
        return next(size for n, _, size in self.slots if n == name)


@dataclass(frozen=True)
class ParamContext:
    """What an ``encode`` function sees: the Settings, the current plan's kv lengths [B] and, for
    prefill, its query lengths [B] (None: decode, one query token per request)."""

    settings: Settings
    kv_len: np.ndarray
    qo_len: np.ndarray | None = None


Encoder = Callable[[dict[str, Any], ParamContext], dict[str, Any]]

# a small Settings the hooks are checked against at Variant construction
_SAMPLE_SETTINGS = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, max_batch_size=2, max_num_pages=4, max_custom_mask_bits=48)


def _params_tuple(params: Mapping[str, Any] | Iterable[Param]) -> tuple[Param, ...]:
    if isinstance(params, Mapping):
        return tuple(p if isinstance(p, Param) else Param(name, p) for name, p in params.items())
    return tuple(params)


class Variant:
    """An attention variant: hooks, run-time parameters, softmax on/off (see the module doc).

    ``encode`` / ``encode_inputs``: run-time inputs that are not stored as given but turned into
    parameters by ``encode(values, ParamContext) -> {param: value}`` (the custom mask)."""

    def __init__(
        self,
        name: str = "custom",
        *,
        query_transform: Any = None,
        key_transform: Any = None,
        logits_transform: Any = None,
        logits_mask: Any = None,
        output_transform: Any = None,
        query_pair_transform: Any = None,
        key_pair_transform: Any = None,
        sink: Any = None,
        params: Mapping[str, Any] | Iterable[Param] = (),
        softmax: bool = True,
        encode: Encoder | None = None,
        encode_inputs: Sequence[str] = (),
    ) -> None:
        given = dict(query_transform=query_transform, key_transform=key_transform,
                     logits_transform=logits_transform, logits_mask=logits_mask,
                     output_transform=output_transform, query_pair_transform=query_pair_transform,
                     key_pair_transform=key_pair_transform, sink=sink)  # fmt: skip
        hooks = {kind: ((fn,) if fn is not None else ()) for kind, fn in given.items()}
        self._init(name, hooks, _params_tuple(params), bool(softmax), [(encode, tuple(encode_inputs))] if encode else [])

    def _init(self, name, hooks, params, softmax, encoders) -> None:
        if not isinstance(name, str) or not name:
            raise VariantError(f"a variant's name must be a non-empty str, got {name!r}")
        self.name = name
        self.softmax = softmax
        self.params: tuple[Param, ...] = params
        self._encoders: list[tuple[Encoder, tuple[str, ...]]] = encoders
        for p in params:
            if not isinstance(p, Param):
                raise VariantError(f"variant {self.name!r}: params must be Param objects or a name -> shape mapping, got {p!r}")
        names = [p.name for p in params]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise VariantError(f"variant {self.name!r}: parameter(s) {dupes} declared twice")
        for p in params:
            if not isinstance(p.name, str) or not p.name.isidentifier():
                raise VariantError(f"variant {self.name!r}: parameter name {p.name!r} is not an identifier")
            if p.check is not None and p.default is not None and not callable(p.default):
                problem = p.check(np.asarray(p.default, np.float32).reshape(-1))
                if problem:
                    raise VariantError(f"variant {self.name!r}: parameter {p.name!r} default {p.default!r} {problem}")
        if not softmax and hooks.get("sink"):
            raise VariantError(f"variant {self.name!r}: a sink needs softmax (softmax=False has no denominator)")
        if len(hooks.get("sink", ())) > 1:
            raise VariantError(f"variant {self.name!r}: at most one sink hook")
        # kind -> ((hook, names of the params it reads), ...)
        self._hooks: dict[str, tuple[tuple[Any, tuple[str, ...]], ...]] = {}
        for kind, fns in hooks.items():
            entries = []
            for fn in fns:
                entries.append((fn, self._param_args(kind, fn)))
            self._hooks[kind] = tuple(entries)
        digest = vh.fingerprint(
            self.name, softmax, [(k, self._hooks[k]) for k in sorted(self._hooks)],
            [(p.name, p.shape, p.default) for p in params], [e for e, _ in encoders],
        )  # fmt: skip
        self.key = f"{self.name}#{digest[:16]}"
        self._check_hooks()

    def _param_args(self, kind: str, fn: Any) -> tuple[str, ...]:
        label = f"variant {self.name!r}: {kind} hook {getattr(fn, '__name__', fn)!r}"
        try:
            extras = vh.param_arguments(kind, fn)
        except vh.HookError as exc:
            raise VariantError(f"{label} {exc}") from None
        declared = {p.name for p in self.params}
        for extra in extras:
            if extra not in declared:
                raise VariantError(
                    f"{label}: argument {extra!r} is not a declared parameter (declared: {sorted(declared)}); "
                    f"a {kind} hook takes ({', '.join(vh.HOOK_ARGS[kind])}) then parameter names"
                )
        return extras

    def _check_hooks(self) -> None:
        settings = Settings(**_SAMPLE_SETTINGS)
        layout = self.param_layout(settings)
        sample = np.ones(layout.total, np.float32)
        for name, off, size in layout.slots:
            default = next(p for p in self.params if p.name == name).default
            try:
                value = np.asarray(default(settings) if callable(default) else default, np.float32).reshape(-1)
                if default is not None and value.size in (1, size):
                    sample[off : off + size] = value
            except Exception:  # a default that needs other Settings: the ones will do
                pass
        for kind, entries in self._hooks.items():
            for fn, extras in entries:
                try:
                    vh.check_hook(kind, fn, tuple(layout.offset(e) for e in extras), sample)
                except vh.HookError as exc:
                    raise VariantError(f"variant {self.name!r}: {kind} hook {getattr(fn, '__name__', fn)!r} {exc}") from None

    # ---- parameters ---------------------------------------------------------------------------

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names ``run(params=...)`` accepts: the declared parameters and the encoded inputs."""
        return tuple(p.name for p in self.params) + tuple(n for _, names in self._encoders for n in names)

    def param_layout(self, settings: Settings) -> ParamLayout:
        slots, offset = [], 0
        for p in self.params:
            size = p.size(settings)
            if size < 1:
                raise VariantError(f"variant {self.name!r}: parameter {p.name!r} has size {size} under these Settings")
            slots.append((p.name, offset, size))
            offset += size
        return ParamLayout(tuple(slots), max(1, offset))

    def defaults(self, settings: Settings) -> tuple[dict[str, np.ndarray], list[str]]:
        """(default values by name, names of the required parameters with no default)."""
        values, required = {}, []
        for p in self.params:
            if p.default is None:
                required.append(p.name)
            else:
                value = np.asarray(p.default(settings) if callable(p.default) else p.default, np.float32).reshape(-1)
                size = p.size(settings)
                values[p.name] = np.full(size, value[0], np.float32) if value.size == 1 and size > 1 else value
        return values, required

    def encode(self, values: Mapping[str, Any], context: Callable[[], ParamContext]) -> dict[str, Any]:
        """Check names and turn encoded inputs into parameters (``context`` is called only if needed)."""
        unknown = sorted(set(values) - set(self.input_names))
        if unknown:
            raise InputError(f"params: {unknown} unknown to variant {self.name!r} (it takes {sorted(self.input_names)})")
        out = dict(values)
        for encoder, names in self._encoders:
            taken = {n: out.pop(n) for n in names if n in out}
            if taken:
                out.update(encoder(taken, context()))
        return out

    def check_value(self, name: str, value: Any, settings: Settings, layout: ParamLayout) -> torch.Tensor:
        """``value`` as a flat float32 tensor that fits parameter ``name`` (InputError otherwise)."""
        param = next(p for p in self.params if p.name == name)
        try:
            t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value, np.float64))
        except (TypeError, ValueError) as exc:
            raise InputError(f"params[{name!r}] is not numeric: {exc}") from None
        t = t.reshape(-1).to(torch.float32)
        size = layout.size(name)
        exact = param.shape in ("scalar", "qo_head")
        if (exact and t.numel() != size) or t.numel() > size:
            what = {"scalar": "a scalar", "qo_head": f"{size} values (num_qo_heads)"}.get(param.shape, f"at most {size} values")
            raise InputError(f"params[{name!r}] must hold {what}, got {t.numel()}")
        if bool(torch.isnan(t).any()):
            raise InputError(f"params[{name!r}] has NaN values")
        if param.check is not None:
            problem = param.check(t.cpu().numpy())
            if problem:
                raise InputError(f"params[{name!r}] {problem}")
        return t

    # ---- kernel side --------------------------------------------------------------------------

    def decode_hooks(self, settings: Settings) -> DecodeHooks:
        """The compile-time hooks of this variant under ``settings``: one object per (variant key,
        param layout) in the process, so equal variants share compiled kernels (kernels are cached
        per DecodeConfig = hooks + dtype + head_dim + group + block)."""
        layout = self.param_layout(settings)
        hooks = _HOOKS_CACHE.get((self.key, layout))
        if hooks is None:
            if self.key.startswith("default#") and not any(self._hooks.values()) and self.softmax:
                hooks = DEFAULT_HOOKS
            else:
                built = {}
                for kind, entries in self._hooks.items():
                    if entries:
                        parts = [(fn, tuple(layout.offset(e) for e in extras)) for fn, extras in entries]
                        built[kind] = vh.compose(kind, parts, tag=self.name.replace("-", "_"))
                hooks = DecodeHooks(name=self.key, softmax=self.softmax, **built)
            _HOOKS_CACHE[(self.key, layout)] = hooks
        return hooks

    @property
    def has_sink(self) -> bool:
        return bool(self._hooks.get("sink"))

    def has_hook(self, kind: str) -> bool:
        """Whether this variant sets hook ``kind`` (a name of kernels.hooks.AttentionHooks, e.g.
        "output_transform")."""
        if kind not in vh.HOOK_ARGS:
            raise InputError(f"unknown hook kind {kind!r} (one of {sorted(vh.HOOK_ARGS)})")
        return bool(self._hooks.get(kind))

    @property
    def has_encoded_inputs(self) -> bool:
        """Whether some run-time inputs are encoded into parameters (the custom mask)."""
        return bool(self._encoders)

    def without_sink(self) -> "Variant":
        """This variant minus its sink: same hooks otherwise, same parameters and layout (itself when
        it has no sink). A cascade's levels before the last use it, so a sink joins each row's softmax
        denominator once."""
        if not self.has_sink:
            return self
        hooks = {kind: tuple(fn for fn, _ in entries) for kind, entries in self._hooks.items() if kind != "sink"}
        hooks["sink"] = ()
        bare = Variant.__new__(Variant)
        bare._init(f"{self.name}_nosink", hooks, self.params, self.softmax, list(self._encoders))
        return bare

    def __repr__(self) -> str:
        kinds = [k for k, v in self._hooks.items() if v]
        return f"Variant({self.key!r}, hooks={kinds}, params={[p.name for p in self.params]}, softmax={self.softmax})"


_HOOKS_CACHE: dict[tuple[str, ParamLayout], DecodeHooks] = {}


def combine(*variants: Variant, name: str | None = None) -> Variant:
    """One variant doing all of ``variants``: transforms in order, logits transforms chained, masks
    AND-ed, parameters concatenated (names must not clash), at most one sink, the same softmax."""
    if not variants:
        raise VariantError("combine() needs at least one variant")
    for i, v in enumerate(variants):
        if not isinstance(v, Variant):
            raise VariantError(f"combine(): variants[{i}] is a {type(v).__name__}, not a tilegraph.Variant")
    softmax = {v.softmax for v in variants}
    if len(softmax) != 1:
        raise VariantError("combine(): softmax and softmax-free variants cannot be mixed")
    hooks: dict[str, tuple[Any, ...]] = {kind: () for kind in vh.HOOK_ARGS}
    for v in variants:
        for kind, entries in v._hooks.items():
            hooks[kind] += tuple(fn for fn, _ in entries)
    combined = Variant.__new__(Variant)
    encoders = [e for v in variants for e in v._encoders]
    combined._init(name or "+".join(v.name for v in variants), hooks, tuple(p for v in variants for p in v.params), softmax.pop(), encoders)
    return combined


DEFAULT = Variant("default")
