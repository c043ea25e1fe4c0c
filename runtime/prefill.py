"""``tilegraph.BatchPrefill`` / ``BatchPrefillRagged``: batch prefill / append attention, mixed batches.

    pre = tilegraph.BatchPrefill(settings, causal=True, device="cuda")   # "cpu": the numba CUDA simulator
    plan = pre.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len)  # -> PrefillPlan (host), staged
    out = pre.run(q, kv_cache)                           # q [nnz_q, Hq, D] -> out [nnz_q, Hq, D]
    out, lse = pre.run(q, kv_cache, return_lse=True)     # lse float32 [nnz_q, Hq], natural log

    rag = tilegraph.BatchPrefillRagged(settings, causal=True)
    rag.plan(qo_indptr, kv_indptr)                       # kv_indptr: KV token offsets into k / v
    out = rag.run(q, k, v)                               # k, v [nnz_kv, Hkv, D]

    pre = tilegraph.BatchPrefill(settings, causal=True, variant=variants.soft_cap(30.0))
    pre.run(q, kv_cache, params={"logits_soft_cap": 50.0})  # the variant's run-time parameters (they persist)

Request r owns query rows qo_indptr[r] : qo_indptr[r+1] of q (its qo_len tokens are the *last*
qo_len positions of its KV: causal masking lets query i see KV positions <= kv_len - qo_len + i).
Decode requests (qo_len 1) and prefill requests mix freely in one plan and one launch (plus one
merge launch for split tiles). ``padded_num_tokens`` (the graph runtime's token bucket) gives q/out
that many rows; rows past qo_indptr[-1] are neither read nor written.

Variants (``tilegraph.Variant``) as for decode: every hook sees qo_pos = the query token's position in
the KV (kv_len - qo_len + i); the custom mask takes a [qo_len, kv_len] block per request; the params
buffer is fixed (listed in graph_buffers) and the plan key names the variant.

Every error a caller can cause is raised before any kernel launches and nothing is written.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import numpy as np
import torch

from tilegraph._device import resolve_device
from tilegraph.errors import InputError, PlanError, StateError
from tilegraph.graphs.protocol import PlanState
from tilegraph.kernels import primitives as prim
from tilegraph.kernels.decode import DEFAULT_HOOKS, DecodeHooks
from tilegraph.kernels.launch import as_words, launch
from tilegraph.kernels.merge import PARTIAL_MERGE_SIGNATURE, partial_merge_kernel
from tilegraph.kernels.prefill import PrefillConfig, default_threads, prefill_kernel, prefill_signature
from tilegraph.nvtx_ranges import plan_range
from tilegraph.planner.prefill import PrefillPlan, plan_prefill, plan_prefill_ragged
from tilegraph.planner.prefill_layout import PrefillLayout

from .decode import resolve_num_ctas
from .checks import check_out, check_q, span_words
from .kv_cache import KVCache, PagedKV, paged_kv
from .settings import Settings
from .variants import DEFAULT, ParamContext, Variant, compile_with_progress
from .workspace import StagedUpload, Workspace

_plan_serials = itertools.count(1)
_handles = itertools.count(1)
_instances: "weakref.WeakValueDictionary[int, _PrefillBase]" = weakref.WeakValueDictionary()


def prefill_workspace_nbytes(settings: Settings, device: str | torch.device | None = None, paged: bool = True) -> int:
    """Device bytes of one prefill workspace: an exact function of Settings and the device."""
    dev = resolve_device(device)
    return PrefillLayout.from_settings(settings, resolve_num_ctas(settings, dev), paged).workspace_nbytes


class _PrefillBase:
    """Shared by the paged and ragged forms: workspace, config, plan staging, graph protocol, launch."""

    MERGE_CTAS = 4  # fixed grid of the partial-merge kernel (it loops over the live merge entries)
    PAGED = True

    def __init__(
        self,
        settings: Settings,
        causal: bool = False,
        device: str | torch.device | None = None,
        hooks: DecodeHooks = DEFAULT_HOOKS,
        variant: Variant | None = None,
        plan_upload: tuple[StagedUpload, int] | None = None,
    ):
        """``variant``: a tilegraph.Variant (default: plain softmax attention). ``hooks``: raw
        compile-time DecodeHooks without run-time parameters (lower level; not with ``variant``).
        ``plan_upload``: (a shared StagedUpload, word offset) to place this object's plan in, so
        several objects' plans reach the device in one copy (CascadeAttention's levels)."""
        if variant is not None and hooks is not DEFAULT_HOOKS:
            raise InputError("pass either variant= or hooks=, not both")
        if variant is not None and not isinstance(variant, Variant):
            raise InputError(f"variant must be a tilegraph.Variant, got {type(variant).__name__}")
        self.variant = variant if variant is not None else DEFAULT
        if variant is not None:
            hooks = variant.decode_hooks(settings)
        self.settings = settings
        self.causal = bool(causal)
        self.device = resolve_device(device)
        self.num_ctas = resolve_num_ctas(settings, self.device)
        self.layout = PrefillLayout.from_settings(settings, self.num_ctas, paged=self.PAGED)
        self.workspace = Workspace(self.layout, self.device, upload=plan_upload)
        self.config = PrefillConfig(
            kind=prim.DTYPE_CODES[settings.dtype],
            head_dim=settings.head_dim,
            group=settings.group_size,
            paged=self.PAGED,
            causal=self.causal,
            threads=default_threads(),
            hooks=hooks,
        )
        assert self.config.q_tile == self.layout.q_tile, "kernel and planner disagree on the query tile"
        self.param_layout = self.variant.param_layout(settings)
        # the variant's run-time parameters: one fixed float32 buffer (graph replays read it in place)
        self.params = torch.zeros(self.param_layout.total, dtype=torch.float32, device=self.device)
        defaults, self._missing_params = self.variant.defaults(settings)
        self._plan: PrefillPlan | None = None
        self._write_params(defaults)
        self._rows = 0  # q/out rows the current plan expects (its tokens, or the padded bucket)
        # caller positions (CascadeAttention's levels): off by default -- one-word stand-ins, flag 0
        self._no_positions = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._positions: tuple[torch.Tensor, torch.Tensor] | None = None
        self._capturing = False
        self._handle = next(_handles)
        _instances[self._handle] = self

    @property
    def workspace_nbytes(self) -> int:
        return self.layout.workspace_nbytes

    @property
    def current_plan(self) -> PrefillPlan | None:
        return self._plan

    def _accept(self, plan: PrefillPlan, padded_num_tokens: int | None) -> PrefillPlan:
        rows = plan.num_tokens if padded_num_tokens is None else int(padded_num_tokens)
        if rows < plan.num_tokens or rows > self.settings.max_num_tokens:
            raise PlanError(
                f"padded_num_tokens={padded_num_tokens} must lie in [qo_indptr[-1]={plan.num_tokens}, "
                f"max_num_tokens={self.settings.max_num_tokens}]"
            )
        self.workspace.stage(plan.buffer)
        self._plan, self._rows = plan, rows
        return plan

    def _use_positions(self, row_qo_pos: torch.Tensor | None, entry_kv_offset: torch.Tensor | None = None) -> None:
        """Make the kernel take every query row's qo_pos from ``row_qo_pos`` (int32, indexed by the
        global query row) and add ``entry_kv_offset[entry]`` (int32 per plan entry) to every kv
        position its hooks see, instead of the request-local positions (None: back to those). Both
        are fixed device buffers read at run time (the caller fills them, e.g. in a staged upload)."""
        if row_qo_pos is None:
            self._positions = None
            return
        assert entry_kv_offset is not None and row_qo_pos.dtype == entry_kv_offset.dtype == torch.int32
        self._positions = (row_qo_pos, entry_kv_offset)

    def _refuse_while_capturing(self) -> None:
        if self._capturing:
            raise StateError("plan() was called while a CUDA graph capture is in progress: plan before capturing or replaying")

    # ---- graph protocol (tilegraph.graphs.protocol.GraphAware); the bucket is the padded token count --

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
        form = "paged" if self.PAGED else "ragged"
        return f"prefill:{form}:{'causal' if self.causal else 'full'}|{self.settings.model_dump_json()}|{self.config.hooks.name}"

    # ---- variant parameters (as BatchDecode's) ---------------------------------------------------

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
            raise StateError("this parameter depends on the plan (its query and kv lengths): call plan() first")
        plan = self._plan
        batch = plan.batch_size
        qo_indptr = plan.section("qo_indptr")[: batch + 1].astype(np.int64)
        return ParamContext(self.settings, plan.section("kv_len")[:batch].copy(), np.diff(qo_indptr))

    def _write_params(self, values: dict[str, Any]) -> None:
        checked = {n: self.variant.check_value(n, v, self.settings, self.param_layout) for n, v in values.items()}
        for name, t in checked.items():
            offset = self.param_layout.offset(name)
            self.params[offset : offset + t.numel()].copy_(t.to(self.device))
        self._missing_params = [n for n in self._missing_params if n not in checked]

    def _prepare_run(self, params: dict[str, Any] | None, return_lse: bool) -> None:
        """run()'s variant checks: plan present, params written, required params given, LSE available."""
        if self._plan is None:
            raise StateError("run() was called before plan(): plan the batch first")
        if params is not None:
            self.set_params(params)
        if self._missing_params:
            raise InputError(f"variant {self.variant.name!r} needs params {self._missing_params}: pass run(..., params={{...}})")
        if return_lse and not self.config.hooks.softmax:
            raise InputError(f"return_lse=True: variant {self.variant.name!r} is softmax-free and has no LSE")

    # ---- checks ---------------------------------------------------------------------------------

    def _check_q(self, q: Any) -> torch.Tensor:
        return check_q(q, self.settings, self.device, self._rows, "nnz_q",
                       "q has {got} query tokens but the plan was made for {want} (qo_indptr[-1] or padded_num_tokens)")  # fmt: skip

    def _check_out(self, out: Any) -> torch.Tensor:
        return check_out(out, self.settings, self.device, self._rows)

    def _outputs(self, out: torch.Tensor | None, return_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self._plan is None:
            raise StateError("run() was called before plan(): plan the batch first")
        s = self.settings
        if out is None:
            out = torch.empty((self._rows, s.num_qo_heads, s.head_dim), dtype=s.torch_dtype, device=self.device)
        lse = torch.empty((self._rows if return_lse else 0, s.num_qo_heads), dtype=torch.float32, device=self.device)
        return out, lse

    # ---- launch ---------------------------------------------------------------------------------

    def _launch(self, q: torch.Tensor, kv: PagedKV, out: torch.Tensor, lse: torch.Tensor | None) -> None:
        """One attention launch over the fixed grid, then one partial-merge launch (no host sync)."""
        ws, sec, s = self.workspace, self.workspace.sections, self.settings
        words_per_elem = q.element_size() / 4
        lse_arg = lse.view(-1) if lse is not None else ws.no_lse
        out_words = as_words(out)
        hooks = self.config.hooks
        kernel = prefill_kernel(self.config)
        merge_kernel = partial_merge_kernel(self.config.kind, hooks, True)
        form = "paged" if self.PAGED else "ragged"
        label = f"prefill[{s.dtype},hd{s.head_dim},g{s.group_size},{form},{'causal' if self.causal else 'full'},{hooks.name}]"
        compile_with_progress(label, [(kernel, prefill_signature()), (merge_kernel, PARTIAL_MERGE_SIGNATURE)])
        launch(
            "prefill",
            kernel,
            (self.num_ctas,),
            self.config.block,
            (
                sec["header"], sec["cta_tile_indptr"], sec["tile_request"], sec["tile_q_start"], sec["tile_q_end"],
                sec["tile_kv_head"], sec["tile_kv_start"], sec["tile_kv_end"], sec["tile_slot"], sec["tile_slot_stride"],
                sec["qo_indptr"], sec["kv_indptr"], sec["kv_indices"], sec["kv_len"],
                span_words(q), np.int64(q.stride(0) * words_per_elem), np.int64(q.stride(1) * words_per_elem),
                kv.k_words, kv.v_words, np.int64(kv.page_stride), np.int64(kv.token_stride),
                np.int64(kv.head_stride), np.int64(s.page_size),
                out_words, lse_arg, np.int32(lse is not None), ws.partial_out, ws.partial_lse,
                np.float32(s.sm_scale), np.int64(s.num_qo_heads), self.params,
                *(self._positions or (self._no_positions, self._no_positions)), np.int32(self._positions is not None),
            ),
        )  # fmt: skip
        ws.launch_merge(s, self.config.kind, hooks, self.params, out_words, lse_arg, lse is not None, self.MERGE_CTAS, prefill=True)

    def _finish_checked(self, q: torch.Tensor, kv: PagedKV, out: Any, lse: torch.Tensor, return_lse: bool) -> None:
        out = self._check_out(out)
        if not self._capturing:
            self.workspace.flush()
        assert self._plan is not None
        if self._plan.num_tokens:
            self._launch(q, kv, out, lse if return_lse else None)


class BatchPrefill(_PrefillBase):
    """Prefill / append attention over the paged KV cache (CUDA-graph safe: launch shapes never change).

    causal: mask aligned to the end of the KV (query i of a request with qo_len q and kv_len k sees
    KV positions <= k - q + i); qo_len > kv_len is then an InputError at plan()."""

    PAGED = True

    @plan_range
    def plan(
        self,
        qo_indptr: Any,
        kv_indptr: Any,
        kv_indices: Any,
        kv_last_page_len: Any,
        padded_num_tokens: int | None = None,
    ) -> PrefillPlan:
        """Validate the batch, balance its tiles over the CTAs and stage the plan for upload.

        qo_indptr [B+1] (query token offsets into q), kv_indptr [B+1], kv_indices [nnz_pages],
        kv_last_page_len [B]: int32 CPU tensors or numpy arrays. ``padded_num_tokens`` (>=
        qo_indptr[-1], <= max_num_tokens): q/out then have that many rows. The staged plan reaches
        the device in ONE async copy on the stream of the next ``run()`` (or graph replay)."""
        self._refuse_while_capturing()
        plan = plan_prefill(
            self.layout, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
            num_pages=self.settings.max_num_pages, causal=self.causal, serial=next(_plan_serials),
            allow_split=self.config.splittable,
        )  # fmt: skip
        return self._accept(plan, padded_num_tokens)

    def graph_prepare_capture(self, num_tokens: int) -> None:
        """A stand-in plan for a token bucket: one request of ``num_tokens`` queries over as many KV
        tokens, every page reference page 0."""
        pages = -(-num_tokens // self.settings.page_size)
        last = num_tokens - (pages - 1) * self.settings.page_size
        self.plan(
            np.array([0, num_tokens], np.int32), np.array([0, pages], np.int32), np.zeros(pages, np.int32),
            np.array([last], np.int32), padded_num_tokens=num_tokens,
        )  # fmt: skip

    def run(
        self,
        q: torch.Tensor,
        kv_cache: KVCache,
        out: torch.Tensor | None = None,
        return_lse: bool = False,
        params: dict[str, Any] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``q`` [nnz_q, num_qo_heads, head_dim] over the planned pages of ``kv_cache``.

        q may be a strided view whose last dim is contiguous and whose pointer and strides are 16-byte
        aligned. Returns ``out`` [nnz_q, num_qo_heads, head_dim] (Settings dtype) and, with
        ``return_lse``, the natural-log LSE float32 [nnz_q, num_qo_heads]. Runs as the custom op
        ``torch.ops.tilegraph.batch_prefill``. ``params``: the variant's run-time parameters
        (``set_params``; they persist)."""
        self._prepare_run(params, return_lse)
        out, lse = self._outputs(out, return_lse)
        if isinstance(kv_cache, (tuple, list)) and len(kv_cache) == 2:
            k_cache, v_cache, paired = kv_cache[0], kv_cache[1], True
        else:
            k_cache, v_cache, paired = kv_cache, kv_cache, False
        named = (("q", q), ("kv_cache", k_cache), ("kv_cache", v_cache), ("out", out))
        bad = next((n for n, t in named if not isinstance(t, torch.Tensor)), None)
        if bad is not None:
            raise InputError(f"{bad} must be a torch.Tensor (or, for kv_cache, a (k_cache, v_cache) pair of them)")
        torch.ops.tilegraph.batch_prefill(self._handle, q, k_cache, v_cache, paired, out, lse, return_lse)
        return (out, lse) if return_lse else out

    def _run_checked(self, q, k_cache, v_cache, paired, out, lse, return_lse) -> None:
        plan = self._plan
        assert plan is not None
        q = self._check_q(q)
        kv = paged_kv((k_cache, v_cache) if paired else k_cache, self.settings, self.device)
        if plan.max_page_index >= kv.num_pages:
            raise InputError(f"kv_cache has {kv.num_pages} pages but the plan references page {plan.max_page_index}")
        self._finish_checked(q, kv, out, lse, return_lse)


class BatchPrefillRagged(_PrefillBase):
    """Prefill attention over contiguous ragged K/V [nnz_kv, num_kv_heads, head_dim] (request r's KV is
    rows kv_indptr[r] : kv_indptr[r+1]). Same masking, outputs and graph protocol as BatchPrefill."""

    PAGED = False

    @plan_range
    def plan(self, qo_indptr: Any, kv_indptr: Any, padded_num_tokens: int | None = None) -> PrefillPlan:
        """qo_indptr [B+1], kv_indptr [B+1] (KV token offsets): int32 CPU tensors or numpy arrays."""
        self._refuse_while_capturing()
        plan = plan_prefill_ragged(
            self.layout, qo_indptr, kv_indptr, causal=self.causal, serial=next(_plan_serials), allow_split=self.config.splittable
        )
        return self._accept(plan, padded_num_tokens)

    def graph_prepare_capture(self, num_tokens: int) -> None:
        """A stand-in plan for a token bucket: one request of ``num_tokens`` queries over as many KV rows
        (k / v of the captured forward need at least ``num_tokens`` rows)."""
        indptr = np.array([0, num_tokens], np.int32)
        self.plan(indptr, indptr, padded_num_tokens=num_tokens)

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor | None = None,
        return_lse: bool = False,
        params: dict[str, Any] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``q`` [nnz_q, Hq, D] over ragged ``k`` / ``v`` [nnz_kv, Hkv, D] (contiguous,
        Settings dtype, nnz_kv >= kv_indptr[-1]). Returns ``out`` [nnz_q, Hq, D] and, with
        ``return_lse``, the natural-log LSE float32 [nnz_q, Hq]. Runs as the custom op
        ``torch.ops.tilegraph.batch_prefill_ragged``. ``params``: as for BatchPrefill.run."""
        self._prepare_run(params, return_lse)
        out, lse = self._outputs(out, return_lse)
        named = (("q", q), ("k", k), ("v", v), ("out", out))
        bad = next((n for n, t in named if not isinstance(t, torch.Tensor)), None)
        if bad is not None:
            raise InputError(f"{bad} must be a torch.Tensor")
        torch.ops.tilegraph.batch_prefill_ragged(self._handle, q, k, v, out, lse, return_lse)
        return (out, lse) if return_lse else out

    def _check_kv(self, name: str, t: torch.Tensor) -> None:
        s = self.settings
        if t.dtype != s.torch_dtype:
            raise InputError(f"{name} has dtype {t.dtype}, Settings.dtype is {s.dtype}")
        if t.device != self.device:
            raise InputError(f"{name} is on {t.device}, the attention object runs on {self.device}")
        if t.dim() != 3 or tuple(t.shape[1:]) != (s.num_kv_heads, s.head_dim):
            raise InputError(f"{name} must be [nnz_kv, num_kv_heads={s.num_kv_heads}, head_dim={s.head_dim}], got {tuple(t.shape)}")
        if not t.is_contiguous() or t.data_ptr() % 16:
            raise InputError(f"{name} must be contiguous and 16-byte aligned")
        assert self._plan is not None
        if t.shape[0] < self._plan.kv_tokens:
            raise InputError(f"{name} has {t.shape[0]} rows but kv_indptr[-1] = {self._plan.kv_tokens}")

    def _run_checked(self, q, k, v, out, lse, return_lse) -> None:
        q = self._check_q(q)
        self._check_kv("k", k)
        self._check_kv("v", v)
        row_words = self.settings.head_dim * k.element_size() // 4
        token_stride = self.settings.num_kv_heads * row_words
        kv = PagedKV(as_words(k), as_words(v), 0, token_stride, row_words, k.shape[0])
        self._finish_checked(q, kv, out, lse, return_lse)


def _instance(handle: int) -> _PrefillBase:
    obj = _instances.get(handle)
    if obj is None:
        raise StateError(f"the prefill object behind handle {handle} no longer exists")
    return obj


@torch.library.custom_op("tilegraph::batch_prefill", mutates_args=("out", "lse"))
def _batch_prefill_op(
    handle: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, paired: bool,
    out: torch.Tensor, lse: torch.Tensor, return_lse: bool,
) -> None:  # fmt: skip
    _instance(handle)._run_checked(q, k_cache, v_cache, paired, out, lse, return_lse)  # type: ignore[attr-defined]


@_batch_prefill_op.register_fake
def _batch_prefill_fake(handle, q, k_cache, v_cache, paired, out, lse, return_lse) -> None:
    return None


@torch.library.custom_op("tilegraph::batch_prefill_ragged", mutates_args=("out", "lse"))
def _batch_prefill_ragged_op(
    handle: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, return_lse: bool,
) -> None:  # fmt: skip
    _instance(handle)._run_checked(q, k, v, out, lse, return_lse)  # type: ignore[call-arg]


@_batch_prefill_ragged_op.register_fake
def _batch_prefill_ragged_fake(handle, q, k, v, out, lse, return_lse) -> None:
    return None
