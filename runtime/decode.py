"""``tilegraph.BatchDecode``: plan a batch of paged requests, then run split-KV decode attention.

    dec = tilegraph.BatchDecode(settings, device="cuda")       # "cpu": the numba CUDA simulator
    plan = dec.plan(kv_indptr, kv_indices, kv_last_page_len)   # -> tilegraph.Plan (host), uploaded
    out = dec.run(q, kv_cache)                                 # q [B, Hq, D] -> out [B, Hq, D]
    out, lse = dec.run(q, kv_cache, return_lse=True)           # lse float32 [B, Hq], natural log
    dec.run(q, kv_cache, out=buffer)                           # writes into buffer, returns it

    dec = tilegraph.BatchDecode(settings, variant=variants.soft_cap(30.0))  # from tilegraph import variants
    dec.run(q, kv_cache, params={"logits_soft_cap": 50.0})     # its run-time parameters (they persist)

Every error a caller can cause is raised before any kernel launches and nothing is written.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import numpy as np
import torch

from tilegraph._device import default_num_ctas, resolve_device
from tilegraph.errors import InputError, PlanError, StateError
from tilegraph.graphs.protocol import PlanState
from tilegraph.kernels import primitives as prim
from tilegraph.kernels.decode import DEFAULT_HOOKS, DecodeConfig, DecodeHooks, decode_kernel, decode_signature, default_bdy
from tilegraph.kernels.launch import as_words, launch
from tilegraph.kernels.merge import PARTIAL_MERGE_SIGNATURE, partial_merge_kernel
from tilegraph.nvtx_ranges import plan_range
from tilegraph.planner.decode import plan_decode
from tilegraph.planner.layout import DecodeLayout
from tilegraph.planner.plan import Plan

from .checks import check_out, check_q, span_words
from .kv_cache import KVCache, paged_kv
from .settings import Settings
from .variants import DEFAULT, ParamContext, Variant, compile_with_progress
from .workspace import Workspace

_plan_serials = itertools.count(1)
_handles = itertools.count(1)
_instances: "weakref.WeakValueDictionary[int, BatchDecode]" = weakref.WeakValueDictionary()


def resolve_num_ctas(settings: Settings, device: torch.device) -> int:
    return settings.num_ctas if settings.num_ctas is not None else default_num_ctas(device)


def workspace_nbytes(settings: Settings, device: str | torch.device | None = None) -> int:
    """Device bytes of one decode workspace (plan tables + fp32 partial outputs and LSEs): an exact
    function of Settings and the device (its SM count decides ``num_ctas`` when Settings leave it None)."""
    dev = resolve_device(device)
    return DecodeLayout.from_settings(settings, resolve_num_ctas(settings, dev)).workspace_nbytes


class BatchDecode:
    """Paged decode attention over a fixed workspace (CUDA-graph safe: launch shapes never change)."""

    MERGE_CTAS = 4  # fixed grid of the partial-merge kernel (it loops over the live merge entries)

    def __init__(
        self,
        settings: Settings,
        device: str | torch.device | None = None,
        hooks: DecodeHooks = DEFAULT_HOOKS,
        variant: Variant | None = None,
    ) -> None:
        """``variant``: a tilegraph.Variant (default: plain softmax attention). ``hooks``: raw
        compile-time DecodeHooks without run-time parameters (lower level; not with ``variant``)."""
        if variant is not None and hooks is not DEFAULT_HOOKS:
            raise InputError("pass either variant= or hooks=, not both")
        if variant is not None and not isinstance(variant, Variant):
            raise InputError(f"variant must be a tilegraph.Variant, got {type(variant).__name__}")
        self.variant = variant if variant is not None else DEFAULT
        if variant is not None:
            hooks = variant.decode_hooks(settings)
        self.settings = settings
        self.device = resolve_device(device)
        self.num_ctas = resolve_num_ctas(settings, self.device)
        self.layout = DecodeLayout.from_settings(settings, self.num_ctas)
        self.workspace = Workspace(self.layout, self.device)
        self.config = DecodeConfig(
            kind=prim.DTYPE_CODES[settings.dtype],
            head_dim=settings.head_dim,
            group=settings.group_size,
            bdy=default_bdy(settings.head_dim),
            hooks=hooks,
        )
        self.param_layout = self.variant.param_layout(settings)
        # the variant's run-time parameters: one fixed float32 buffer (graph replays read it in place)
        self.params = torch.zeros(self.param_layout.total, dtype=torch.float32, device=self.device)
        defaults, self._missing_params = self.variant.defaults(settings)
        self._write_params(defaults)
        self._plan: Plan | None = None
        self._rows = 0  # q/out rows the current plan expects (its batch, or the padded bucket)
        self._capturing = False
        self._handle = next(_handles)
        _instances[self._handle] = self

    @property
    def workspace_nbytes(self) -> int:
        return self.layout.workspace_nbytes

    @property
    def current_plan(self) -> Plan | None:
        return self._plan

    @plan_range
    def plan(self, kv_indptr: Any, kv_indices: Any, kv_last_page_len: Any, padded_batch_size: int | None = None) -> Plan:
        """Validate the page table, balance it over the CTAs and stage it for upload.

        kv_indptr [B+1], kv_indices [nnz_pages], kv_last_page_len [B]: int32 CPU tensors or numpy
        arrays. ``padded_batch_size`` (>= B; the graph runtime's bucket): q/out then have that many
        rows and the rows past B are neither read nor written. The staged plan reaches the device in
        ONE async copy on the stream of the next ``run()`` (or graph replay)."""
        if self._capturing:
            raise StateError("plan() was called while a CUDA graph capture is in progress: plan before capturing or replaying")
        plan = plan_decode(
            self.layout,
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            num_pages=self.settings.max_num_pages,
            serial=next(_plan_serials),
        )
        rows = plan.batch_size if padded_batch_size is None else int(padded_batch_size)
        if rows < plan.batch_size or rows > self.settings.max_batch_size:
            raise PlanError(
                f"padded_batch_size={padded_batch_size} must lie in [B={plan.batch_size}, "
                f"max_batch_size={self.settings.max_batch_size}]"
            )
        self.workspace.stage(plan.buffer)
        self._plan, self._rows = plan, rows
        return plan

    # ---- graph protocol (tilegraph.graphs.protocol.GraphAware) ---------------------------------

    def graph_prepare_capture(self, batch_size: int) -> None:
        """A stand-in plan for a bucket: ``batch_size`` one-token requests on page 0."""
        indptr = np.arange(batch_size + 1, dtype=np.int32)
        self.plan(indptr, np.zeros(batch_size, np.int32), np.ones(batch_size, np.int32))

    def graph_set_capturing(self, capturing: bool) -> None:
        self._capturing = capturing

    def graph_buffers(self) -> dict[str, torch.Tensor]:
        ws = self.workspace
        return {"plan": ws.plan_words, "partial_out": ws.partial_out, "partial_lse": ws.partial_lse,
                "no_lse": ws.no_lse, "no_params": ws.no_params, "params": self.params}  # fmt: skip

    def graph_plan_state(self) -> PlanState:
        serial = self._plan.serial if self._plan is not None else 0
        return PlanState(serial=serial, padded_batch_size=self._rows, key=self._key)

    def graph_before_replay(self) -> None:
        self.workspace.flush()

    @property
    def _key(self) -> str:
        return f"{self.settings.model_dump_json()}|{self.config.hooks.name}"

    # ---- variant parameters --------------------------------------------------------------------

    def set_params(self, params: dict[str, Any]) -> None:
        """Write variant parameters into the fixed params buffer (on the current stream); they
        persist until set again. Checked first: nothing is written when any value is wrong."""
        if self._capturing:
            raise StateError("set_params() (or run(params=...)) during a CUDA graph capture: set them before capturing or replaying")
        if not isinstance(params, dict):
            raise InputError(f"params must be a dict of name -> value, got {type(params).__name__}")
        self._write_params(self.variant.encode(params, self._param_context))

    def _param_context(self) -> ParamContext:
        if self._plan is None:
            raise StateError("this parameter depends on the plan (its kv lengths): call plan() first")
        plan = self._plan
        return ParamContext(self.settings, plan.section("kv_len")[: plan.batch_size].copy())

    def _write_params(self, values: dict[str, Any]) -> None:
        checked = {n: self.variant.check_value(n, v, self.settings, self.param_layout) for n, v in values.items()}
        for name, t in checked.items():
            offset = self.param_layout.offset(name)
            self.params[offset : offset + t.numel()].copy_(t.to(self.device))
        self._missing_params = [n for n in self._missing_params if n not in checked]

    # ---- run -----------------------------------------------------------------------------------

    def _check_q(self, q: Any, batch_size: int) -> torch.Tensor:
        return check_q(q, self.settings, self.device, batch_size, "B",
                       "q has batch size {got} but the plan was made for {want} requests")  # fmt: skip

    def _check_out(self, out: Any, batch_size: int) -> torch.Tensor:
        return check_out(out, self.settings, self.device, batch_size)

    def run(
        self,
        q: torch.Tensor,
        kv_cache: KVCache,
        out: torch.Tensor | None = None,
        return_lse: bool = False,
        params: dict[str, Any] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Decode attention of ``q`` [B, num_qo_heads, head_dim] over the planned pages of ``kv_cache``.

        q may be a strided view (e.g. sliced from a fused QKV projection) whose last dim is contiguous
        and whose pointer and strides are 16-byte aligned. Returns ``out`` [B, num_qo_heads, head_dim]
        (Settings dtype) and, with ``return_lse``, the natural-log LSE float32 [B, num_qo_heads].
        Runs as the custom op ``torch.ops.tilegraph.batch_decode`` (torch.compile traces it whole).
        ``params``: the variant's run-time parameters (``set_params``; they persist)."""
        if self._plan is None:
            raise StateError("run() was called before plan(): plan the batch first")
        if params is not None:
            self.set_params(params)
        if self._missing_params:
            raise InputError(f"variant {self.variant.name!r} needs params {self._missing_params}: pass run(..., params={{...}})")
        if return_lse and not self.config.hooks.softmax:
            raise InputError(f"return_lse=True: variant {self.variant.name!r} is softmax-free and has no LSE")
        s = self.settings
        if out is None:
            out = torch.empty((self._rows, s.num_qo_heads, s.head_dim), dtype=s.torch_dtype, device=self.device)
        lse = torch.empty((self._rows if return_lse else 0, s.num_qo_heads), dtype=torch.float32, device=self.device)
        if isinstance(kv_cache, (tuple, list)) and len(kv_cache) == 2:
            k_cache, v_cache, paired = kv_cache[0], kv_cache[1], True
        else:
            k_cache, v_cache, paired = kv_cache, kv_cache, False
        if not all(isinstance(t, torch.Tensor) for t in (q, k_cache, v_cache, out)):
            bad = next(n for n, t in (("q", q), ("kv_cache", k_cache), ("kv_cache", v_cache), ("out", out)) if not isinstance(t, torch.Tensor))
            raise InputError(f"{bad} must be a torch.Tensor (or, for kv_cache, a (k_cache, v_cache) pair of them)")
        torch.ops.tilegraph.batch_decode(self._handle, q, k_cache, v_cache, paired, out, lse, return_lse)
        return (out, lse) if return_lse else out

    def _run_checked(self, q, k_cache, v_cache, paired, out, lse, return_lse) -> None:
        """Validate everything, then launch (the custom op's implementation)."""
        plan = self._plan
        assert plan is not None
        q = self._check_q(q, self._rows)
        kv = paged_kv((k_cache, v_cache) if paired else k_cache, self.settings, self.device)
        if plan.max_page_index >= kv.num_pages:
            raise InputError(f"kv_cache has {kv.num_pages} pages but the plan references page {plan.max_page_index}")
        out = self._check_out(out, self._rows)
        if not self._capturing:
            self.workspace.flush()
        if plan.batch_size:
            self._launch(q, kv, out, lse if return_lse else None)

    def _launch(self, q: torch.Tensor, kv: Any, out: torch.Tensor, lse: torch.Tensor | None) -> None:
        ws, sec, s = self.workspace, self.workspace.sections, self.settings
        words_per_elem = q.element_size() / 4
        q_words = span_words(q)
        lse_arg = lse.view(-1) if lse is not None else ws.no_lse
        out_words = as_words(out)
        hooks = self.config.hooks
        merge_kernel = partial_merge_kernel(self.config.kind, hooks)
        label = f"decode[{s.dtype},hd{s.head_dim},g{s.group_size},{hooks.name}]"
        compile_with_progress(label, [(decode_kernel(self.config), decode_signature()), (merge_kernel, PARTIAL_MERGE_SIGNATURE)])
        launch(
            "decode",
            decode_kernel(self.config),
            (self.num_ctas,),
            self.config.block,
            (
                sec["header"], sec["cta_tile_indptr"], sec["tile_request"], sec["tile_kv_head"],
                sec["tile_token_start"], sec["tile_token_end"], sec["tile_slot"],
                sec["kv_indptr"], sec["kv_indices"], sec["kv_len"],
                q_words, np.int64(q.stride(0) * words_per_elem), np.int64(q.stride(1) * words_per_elem),
                kv.k_words, kv.v_words, np.int64(kv.page_stride), np.int64(kv.token_stride),
                np.int64(kv.head_stride), np.int64(s.page_size),
                out_words, lse_arg, np.int32(lse is not None), ws.partial_out, ws.partial_lse,
                np.float32(s.sm_scale), np.int64(s.num_qo_heads), self.params,
            ),
        )  # fmt: skip
        ws.launch_merge(s, self.config.kind, hooks, self.params, out_words, lse_arg, lse is not None, self.MERGE_CTAS)


@torch.library.custom_op("tilegraph::batch_decode", mutates_args=("out", "lse"))
def _batch_decode_op(
    handle: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, paired: bool,
    out: torch.Tensor, lse: torch.Tensor, return_lse: bool,
) -> None:  # fmt: skip
    decode = _instances.get(handle)
    if decode is None:
        raise StateError(f"the BatchDecode behind handle {handle} no longer exists")
    decode._run_checked(q, k_cache, v_cache, paired, out, lse, return_lse)


@_batch_decode_op.register_fake
def _batch_decode_fake(handle, q, k_cache, v_cache, paired, out, lse, return_lse) -> None:
    return None
