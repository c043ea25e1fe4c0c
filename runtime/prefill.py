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

from typing import Any

import numpy as np
import torch

from tilegraph._device import resolve_device
from tilegraph.errors import InputError
from tilegraph.kernels.hooks import DEFAULT_HOOKS, AttentionHooks
from tilegraph.kernels.prefill import PrefillConfig, default_threads, prefill_kernel
from tilegraph.kernels.prefill_mma import PrefillMmaConfig, prefill_mma_kernel, tensor_core_config
from tilegraph.kernels.primitives import DTYPE_CODES
from tilegraph.kernels.tuning import prefill_tile_rows
from tilegraph.nvtx_ranges import plan_range
from tilegraph.planner.prefill import PrefillPlan, plan_prefill, plan_prefill_block_table, plan_prefill_device, plan_prefill_ragged
from tilegraph.planner.prefill_layout import ROWS_PER_TILE, PrefillLayout

from .attention import AttentionBase, define_attention_op, device_page_ids, next_plan_serial, padded_rows, resolve_num_ctas
from .decode import check_paged_kv
from .checks import check_bucket
from .kv_cache import PagedKV, strided_words
from .settings import Settings
from .prefill_launch import launch_prefill_kernel
from .variant import ParamContext, Variant
from .workspace import StagedUpload


def prefill_layout(settings: Settings, num_ctas: int, paged: bool = True) -> PrefillLayout:
    """The plan layout prefill objects of ``settings`` use: tiles of the launch tuning table's query
    rows for the Settings dtype and head_dim (kernels.tuning.prefill_tile_rows; both prefill kernels
    run any tile size, so a variant that falls back to CUDA cores shares the layout)."""
    return PrefillLayout.from_settings(settings, num_ctas, paged,
                                       tile_rows=prefill_tile_rows(DTYPE_CODES[settings.dtype], settings.head_dim))  # fmt: skip


def prefill_workspace_nbytes(settings: Settings, device: str | torch.device | None = None, paged: bool = True) -> int:
    """Device bytes of one prefill workspace: an exact function of Settings and the device."""
    if not isinstance(settings, Settings):
        raise InputError(f"settings must be a tilegraph.Settings, got {type(settings).__name__}")
    dev = resolve_device(device)
    return prefill_layout(settings, resolve_num_ctas(settings, dev), paged).workspace_nbytes


class PrefillAttention(AttentionBase):
    """What the paged and ragged prefill objects share: causal flag, kernel config, caller positions,
    the token-row bookkeeping and the launch. ``BatchPrefill`` / ``BatchPrefillRagged`` add plan()
    and their K/V arguments."""

    PAGED = True

    def __init__(
        self,
        settings: Settings,
        causal: bool = False,
        device: str | torch.device | None = None,
        hooks: AttentionHooks = DEFAULT_HOOKS,
        variant: Variant | None = None,
        plan_upload: tuple[StagedUpload, int] | None = None,
    ):
        """``variant``: a tilegraph.Variant (default: plain softmax attention). ``hooks``: raw
        compile-time AttentionHooks without run-time parameters (lower level; not with ``variant``).
        ``plan_upload``: (a shared StagedUpload, word offset) to place this object's plan in, so
        several objects' plans reach the device in one copy (CascadeAttention's levels)."""
        if not isinstance(causal, (bool, np.bool_)):
            raise InputError(f"causal must be a bool, got {causal!r}")
        self.causal = bool(causal)
        self.kind = f"prefill:{'paged' if self.PAGED else 'ragged'}:{'causal' if self.causal else 'full'}"
        super().__init__(settings, device, hooks, variant, plan_upload)
        self.config = PrefillConfig(
            kind=self.kind_code,
            head_dim=settings.head_dim,
            group=settings.group_size,
            paged=self.PAGED,
            causal=self.causal,
            threads=default_threads(),
            hooks=self.hooks,
        )
        # fp16/bf16: the tensor-core kernel on the same plan and arguments (None: the CUDA-core one)
        self.mma_config = tensor_core_config(self.kind_code, settings.head_dim, settings.group_size, self.PAGED,
                                             self.causal, self.hooks)  # fmt: skip
        # plans of short queries only (PrefillPlan.tile_rows 16): the one-warp shape of the same kernel
        self.mma_short_config = tensor_core_config(self.kind_code, settings.head_dim, settings.group_size, self.PAGED,
                                                   self.causal, self.hooks, short=True)  # fmt: skip
        # caller positions (CascadeAttention's levels): off by default -- one-word stand-ins, flag 0
        self._no_positions = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._positions: tuple[torch.Tensor, torch.Tensor] | None = None

    def make_layout(self) -> PrefillLayout:
        return prefill_layout(self.settings, self.num_ctas, paged=self.PAGED)

    @property
    def splittable(self) -> bool:
        """Whether plans of this object may split a request's KV (then partials are merged)."""
        return self.config.splittable

    def stage_prefill_plan(self, plan: PrefillPlan, padded_num_tokens: int | None = None) -> PrefillPlan:
        """Make a plan of this object's layout current (with ``padded_num_tokens`` q/out rows; None:
        its own tokens) and stage it for the next upload. ``plan()`` is ``make_plan`` + this; a
        caller planning several objects all or nothing (CascadeAttention) makes every plan first."""
        rows = padded_rows(padded_num_tokens, "padded_num_tokens", plan.num_tokens, "qo_indptr[-1]",
                           self.settings.max_num_tokens, "max_num_tokens")  # fmt: skip
        return self.stage_plan(plan, rows)

    def has_work(self) -> bool:
        return bool(self._plan.num_tokens)

    def bind_positions(self, row_qo_pos: torch.Tensor | None, entry_kv_offset: torch.Tensor | None = None) -> None:
        """Make the kernel take every query row's qo_pos from ``row_qo_pos`` (int32, indexed by the
        global query row) and add ``entry_kv_offset[entry]`` (int32 per plan entry) to every kv
        position its hooks see, instead of the request-local positions (None: back to those). Both
        are fixed device buffers read at run time (the caller fills them, e.g. in a staged upload);
        they join ``graph_buffers()``."""
        if row_qo_pos is None:
            self._positions = None
            return
        if not (isinstance(row_qo_pos, torch.Tensor) and isinstance(entry_kv_offset, torch.Tensor)):
            raise InputError("bind_positions: row_qo_pos and entry_kv_offset must both be int32 tensors")
        if row_qo_pos.dtype != torch.int32 or entry_kv_offset.dtype != torch.int32:
            raise InputError(f"bind_positions: int32 tensors expected, got {row_qo_pos.dtype} and {entry_kv_offset.dtype}")
        if row_qo_pos.device != self.device or entry_kv_offset.device != self.device:
            raise InputError(f"bind_positions: the buffers must live on {self.device}")
        self._positions = (row_qo_pos, entry_kv_offset)

    @property
    def positions(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The bound caller positions (row_qo_pos, entry_kv_offset), or None (request-local positions)."""
        return self._positions

    def graph_buffers(self) -> dict[str, torch.Tensor]:
        buffers = super().graph_buffers()
        if self._positions is not None:
            buffers["row_qo_pos"], buffers["entry_kv_offset"] = self._positions
        return buffers

    def param_context(self) -> ParamContext:
        """The current plan's kv and query lengths (what encoded variant inputs may depend on)."""
        plan = self._plan
        if plan is None:
            return super().param_context()
        batch = plan.batch_size
        qo_indptr = plan.section("qo_indptr")[: batch + 1].astype(np.int64)
        return ParamContext(self.settings, plan.section("kv_len")[:batch].copy(), np.diff(qo_indptr))

    def q_stride_names(self) -> tuple[tuple[str, int], ...]:
        return (("q_stride_n", 0), ("q_stride_h", 1))

    def tensor_core_launch_config(self) -> PrefillMmaConfig | None:
        """The tensor-core shape the current plan asks for (None: the CUDA-core kernel): the 16-row
        one when the plan holds short queries only (``PrefillPlan.tile_rows``), else the tuning
        table's. Either shape runs any plan, so a captured graph stays correct for later plans."""
        if self.mma_config is None or self._plan is None or self._plan.tile_rows > ROWS_PER_TILE:
            return self.mma_config
        return self.mma_short_config

    def launch(self, q: torch.Tensor, kv: PagedKV, out: torch.Tensor, lse: torch.Tensor | None) -> None:
        """One attention launch over the fixed grid, then one partial-merge launch (no host sync)."""
        s, mma = self.settings, self.tensor_core_launch_config()
        kernel = prefill_kernel(self.config) if mma is None else prefill_mma_kernel(mma)
        shape = "" if mma is None else f",rows{mma.rows}"  # a label per compiled kernel (compiled once each)
        label = f"prefill[{s.dtype},hd{s.head_dim},g{s.group_size},{self.kind.split(':', 1)[1].replace(':', ',')},{self.hooks.name}{shape}]"
        block = self.config.block if mma is None else mma.block
        shared_bytes = 0 if mma is None else mma.dynamic_shared_bytes
        launch_prefill_kernel(self, kernel, block, label, q, kv, out, lse, self._no_positions, self._positions,
                              shared_bytes)  # fmt: skip


class BatchPrefill(PrefillAttention):
    """Prefill / append attention over the paged KV cache (CUDA-graph safe: launch shapes never change).

    causal: mask aligned to the end of the KV (query i of a request with qo_len q and kv_len k sees
    KV positions <= k - q + i); with qo_len > kv_len the first q - k rows see no key and get
    output 0 and LSE -inf (FlashInfer's semantics)."""

    PAGED = True
    OP = define_attention_op("batch_prefill")

    def make_plan(self, qo_indptr: Any, kv_indptr: Any, kv_indices: Any, kv_last_page_len: Any,
                  serial: int | None = None) -> PrefillPlan:  # fmt: skip
        """Validate the batch and balance its tiles over the CTAs, on the host only: nothing is staged
        and the current plan stays in force (``stage_prefill_plan`` makes it current). ``serial``:
        the plan's serial (None: a new one from ``tilegraph.attention.next_plan_serial``)."""
        return plan_prefill(
            self.layout, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
            num_pages=self.settings.max_num_pages, causal=self.causal,
            serial=next_plan_serial() if serial is None else serial, allow_split=self.splittable,
        )  # fmt: skip

    @plan_range
    def plan(
        self,
        qo_indptr: Any,
        kv_indptr: Any,
        kv_indices: Any,
        kv_last_page_len: Any,
        padded_num_tokens: int | None = None,
        page_table: str = "host",
    ) -> PrefillPlan:
        """Validate the batch, balance its tiles over the CTAs and stage the plan for upload.

        qo_indptr [B+1] (query token offsets into q), kv_indptr [B+1], kv_indices [nnz_pages],
        kv_last_page_len [B]: int32 CPU tensors or numpy arrays. ``padded_num_tokens`` (>=
        qo_indptr[-1], <= max_num_tokens): q/out then have that many rows. The staged plan reaches
        the device in ONE async copy on the stream of the next ``run()`` (or graph replay).
        ``page_table="device"``: kv_indices stays on the device, read in place by the kernels
        (BatchDecode.plan's contract)."""
        self.refuse_while_capturing()
        if page_table not in ("host", "device"):
            raise InputError(f"page_table must be 'host' or 'device', got {page_table!r}")
        if page_table == "host":
            plan = self.stage_prefill_plan(self.make_plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len), padded_num_tokens)
            self.use_page_table(None, None, None)
            return plan
        flat, _, _ = device_page_ids(kv_indices, "kv_indices", self.device, block_table=False)
        plan = plan_prefill_device(self.layout, qo_indptr, kv_indptr, kv_last_page_len, flat.numel(),
                                   num_pages=self.settings.max_num_pages, causal=self.causal,
                                   serial=next_plan_serial(), allow_split=self.splittable)  # fmt: skip
        return self.stage_device_plan(plan, padded_num_tokens, "device", kv_indices, flat)

    @plan_range
    def plan_block_table(self, qo_indptr: Any, block_table: torch.Tensor, seq_lens: Any,
                         padded_num_tokens: int | None = None) -> PrefillPlan:  # fmt: skip
        """Plan from a device block table [rows >= B, max_blocks] (BatchDecode.plan_block_table's
        contract) and host int32 ``qo_indptr`` [B+1] and ``seq_lens`` [B] (KV tokens per request,
        its new query tokens included)."""
        self.refuse_while_capturing()
        flat, row_stride, max_blocks = device_page_ids(block_table, "block_table", self.device, block_table=True)
        plan = plan_prefill_block_table(self.layout, qo_indptr, seq_lens, row_stride, max_blocks, flat.numel(),
                                        num_pages=self.settings.max_num_pages, causal=self.causal,
                                        serial=next_plan_serial(), allow_split=self.splittable)  # fmt: skip
        return self.stage_device_plan(plan, padded_num_tokens, "block_table", block_table, flat)

    def stage_device_plan(self, plan: PrefillPlan, padded_num_tokens: int | None, kind: str, source: torch.Tensor,
                          flat: torch.Tensor) -> PrefillPlan:  # fmt: skip
        """Stage a device-page-table plan and bind the caller's table it reads."""
        staged = self.stage_prefill_plan(plan, padded_num_tokens)
        self.use_page_table(kind, source, flat)
        return staged

    def graph_prepare_capture(self, num_tokens: int) -> None:
        """A stand-in plan for a token bucket: one request of ``num_tokens`` queries over as many KV
        tokens, every page reference page 0."""
        num_tokens = check_bucket(num_tokens, "num_tokens", self.settings.max_num_tokens, "max_num_tokens")
        qo = np.array([0, num_tokens], np.int32)
        if self._page_source is not None:  # a device page table stays bound: a request without KV reads none of it
            kind, table = self._page_source
            if kind == "block_table":
                self.plan_block_table(qo, table, np.zeros(1, np.int32), padded_num_tokens=num_tokens)
            else:
                self.plan(qo, np.zeros(2, np.int32), table, np.zeros(1, np.int32), padded_num_tokens=num_tokens,
                          page_table="device")  # fmt: skip
            return
        pages = -(-num_tokens // self.settings.page_size)
        last = num_tokens - (pages - 1) * self.settings.page_size
        self.plan(
            np.array([0, num_tokens], np.int32), np.array([0, pages], np.int32), np.zeros(pages, np.int32),
            np.array([last], np.int32), padded_num_tokens=num_tokens,
        )  # fmt: skip

    def check_kv(self, k: Any, v: Any, paired: bool) -> PagedKV:
        return check_paged_kv(k, v, paired, self.settings, self.device, self._plan.max_page_index)


class BatchPrefillRagged(PrefillAttention):
    """Prefill attention over contiguous ragged K/V [nnz_kv, num_kv_heads, head_dim] (request r's KV is
    rows kv_indptr[r] : kv_indptr[r+1]). Same masking, outputs and graph protocol as BatchPrefill."""

    PAGED = False
    OP = define_attention_op("batch_prefill_ragged", with_paired=False)

    @plan_range
    def plan(self, qo_indptr: Any, kv_indptr: Any, padded_num_tokens: int | None = None) -> PrefillPlan:
        """qo_indptr [B+1], kv_indptr [B+1] (KV token offsets): int32 CPU tensors or numpy arrays."""
        self.refuse_while_capturing()
        plan = plan_prefill_ragged(
            self.layout, qo_indptr, kv_indptr, causal=self.causal, serial=next_plan_serial(), allow_split=self.splittable
        )
        return self.stage_prefill_plan(plan, padded_num_tokens)

    def graph_prepare_capture(self, num_tokens: int) -> None:
        """A stand-in plan for a token bucket: one request of ``num_tokens`` queries over as many KV rows
        (k / v of the captured forward need at least ``num_tokens`` rows)."""
        num_tokens = check_bucket(num_tokens, "num_tokens", self.settings.max_num_tokens, "max_num_tokens")
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
        return self.dispatch(q, k, v, True, out, return_lse, params, ("q", "k", "v"))

    def check_kv(self, k: Any, v: Any, paired: bool) -> PagedKV:
        self._check_rows("k", k)
        self._check_rows("v", v)
        if v.stride() != k.stride():
            raise InputError(f"v strides {v.stride()} differ from k strides {k.stride()}: the kernel addresses both with one "
                             "set, so k and v must share a layout (both slices of one fused QKV output, or both contiguous)")  # fmt: skip
        per_word = k.element_size() / 4
        token_stride, head_stride = int(k.stride(0) * per_word), int(k.stride(1) * per_word)
        return PagedKV(strided_words(k), strided_words(v), 0, token_stride, head_stride, k.shape[0])

    def _check_rows(self, name: str, t: torch.Tensor) -> None:
        """k / v [nnz_kv, num_kv_heads, head_dim]: any strided view (e.g. of a fused QKV output) with
        a contiguous last dim and 16-byte aligned pointer and strides."""
        s = self.settings
        if t.dtype != s.torch_dtype:
            raise InputError(f"{name} has dtype {t.dtype}, Settings.dtype is {s.dtype}")
        if t.device != self.device:
            raise InputError(f"{name} is on {t.device}, the attention object runs on {self.device}")
        if t.dim() != 3 or tuple(t.shape[1:]) != (s.num_kv_heads, s.head_dim):
            raise InputError(f"{name} must be [nnz_kv, num_kv_heads={s.num_kv_heads}, head_dim={s.head_dim}], got {tuple(t.shape)}")
        item = t.element_size()
        if t.stride(2) != 1 or t.data_ptr() % 16 or (t.stride(0) * item) % 16 or (t.stride(1) * item) % 16:
            raise InputError(f"{name} must have a contiguous last dimension and a 16-byte aligned data pointer and "
                             f"strides of dims 0 and 1 (in bytes), got strides {t.stride()}")  # fmt: skip
        if t.shape[0] < self._plan.kv_tokens:
            raise InputError(f"{name} has {t.shape[0]} rows but kv_indptr[-1] = {self._plan.kv_tokens}")


_PrefillBase = PrefillAttention  # the shared base's former (private) name

__all__ = ["BatchPrefill", "BatchPrefillRagged", "PrefillAttention", "prefill_layout", "prefill_workspace_nbytes"]
