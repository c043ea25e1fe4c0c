"""``tilegraph.BatchDecode``: plan a batch of paged requests, then run split-KV decode attention.

    dec = tilegraph.BatchDecode(settings, device="cuda")       # "cpu": the numba CUDA simulator
    plan = dec.plan(kv_indptr, kv_indices, kv_last_page_len)   # -> tilegraph.Plan (host), uploaded
    out = dec.run(q, kv_cache)                                 # q [B, Hq, D] -> out [B, Hq, D]
    out, lse = dec.run(q, kv_cache, return_lse=True)           # lse float32 [B, Hq], natural log
    dec.run(q, kv_cache, out=buffer)                           # writes into buffer, returns it

    dec.plan(kv_indptr, kv_indices_on_device, kv_last_page_len, page_table="device")  # ids stay on the device
    dec.plan_block_table(block_table, seq_lens)                # [B, max_blocks] device table + host lengths

    dec = tilegraph.BatchDecode(settings, variant=variants.soft_cap(30.0))  # from tilegraph import variants
    dec.run(q, kv_cache, params={"logits_soft_cap": 50.0})     # its run-time parameters (they persist)

Two engines, one contract (``dec.engine``, from Settings.decode_engine; "auto" follows the launch
tuning table, kernels.tuning.DECODE_ENGINES): "cuda_cores" runs the pipelined CUDA-core kernel
(kernels.decode_pipeline) on decode plans (``tilegraph.Plan``); "tensor_cores" (float16 / bfloat16;
auto for GQA groups >= 5) plans the batch as one-token prefill requests (planner.decode_prefill,
a ``PrefillPlan``) and runs the tensor-core prefill kernel's one-warp shape, the group's heads as the
rows of its mma tiles. Inputs, outputs, errors and the graph protocol are the same; an engine's
three planners are one ``ENGINE_PLANNERS`` entry, picked once at construction (``dec.planners``).

Every error a caller can cause is raised before any kernel launches and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from tilegraph._device import default_num_ctas, resolve_device
from tilegraph.errors import InputError
from tilegraph.kernels.decode_pipeline import DECODE_PIPELINE_ARGS, decode_pipeline_kernel, pipeline_config
from tilegraph.kernels.hooks import DEFAULT_HOOKS, AttentionHooks
from tilegraph.kernels.primitives import DTYPE_CODES
from tilegraph.kernels.launch import launch
from tilegraph.kernels.merge import PARTIAL_MERGE_SIGNATURE, partial_merge_kernel
from tilegraph.kernels.prefill_mma import prefill_mma_kernel, tensor_core_config
from tilegraph.kernels.tuning import decode_engine_name, decode_tensor_ctas_per_sm
from tilegraph.nvtx_ranges import plan_range
from tilegraph.planner.decode import plan_decode, plan_decode_block_table, plan_decode_device
from tilegraph.planner.decode_prefill import decode_prefill_layout, plan_decode_prefill, plan_decode_prefill_block_table
from tilegraph.planner.decode_prefill import plan_decode_prefill_device
from tilegraph.planner.layout import DecodeLayout
from tilegraph.planner.plan import Plan
from tilegraph.planner.prefill import PrefillPlan
from tilegraph.planner.prefill_layout import PrefillLayout

from .attention import AttentionBase, define_attention_op, device_page_ids, next_plan_serial, padded_rows, resolve_num_ctas
from .checks import check_bucket
from .kv_cache import PagedKV, paged_kv
from .settings import Settings
from .compiling import compile_with_progress
from .prefill_launch import launch_prefill_kernel
from .variant import ParamContext, Variant


@dataclass(frozen=True)
class DecodePlanners:
    """One engine's planners, each taking planner.decode's positional arguments: ``host``
    (layout, kv_indptr, kv_indices, kv_last_page_len, num_pages, serial), ``device`` (layout,
    kv_indptr, kv_last_page_len, num_indices, num_pages, serial), ``block_table`` (layout, seq_lens,
    row_stride, max_blocks, span, num_pages, serial)."""

    host: Callable[..., Plan | PrefillPlan]
    device: Callable[..., Plan | PrefillPlan]
    block_table: Callable[..., Plan | PrefillPlan]


#: each engine's planners: decode plans, or the batch as one-token prefill requests
ENGINE_PLANNERS = {
    "cuda_cores": DecodePlanners(plan_decode, plan_decode_device, plan_decode_block_table),
    "tensor_cores": DecodePlanners(partial(plan_decode_prefill, allow_split=True),
                                   partial(plan_decode_prefill_device, allow_split=True),
                                   partial(plan_decode_prefill_block_table, allow_split=True)),  # fmt: skip
}


def workspace_nbytes(settings: Settings, device: str | torch.device | None = None) -> int:
    """Device bytes of one decode workspace (plan tables + fp32 partial outputs and LSEs): an exact
    function of Settings and the device (its SM count decides ``num_ctas`` when Settings leave it None)."""
    if not isinstance(settings, Settings):
        raise InputError(f"settings must be a tilegraph.Settings, got {type(settings).__name__}")
    return decode_layout(settings, resolve_device(device)).workspace_nbytes


def decode_engine_of(settings: Settings) -> str:
    """The decode engine BatchDecode runs for ``settings``: "cuda_cores" or "tensor_cores"
    (Settings.decode_engine; "auto": kernels.tuning.decode_engine_name's table choice)."""
    return decode_engine_name(DTYPE_CODES[settings.dtype], settings.head_dim, settings.group_size, settings.decode_engine)


def decode_layout(settings: Settings, device: torch.device) -> DecodeLayout | PrefillLayout:
    """The plan layout of BatchDecode: a DecodeLayout (CUDA cores) or the one-token prefill layout
    (tensor cores, planner.decode_prefill), over ``decode_num_ctas`` CTAs."""
    num_ctas = decode_num_ctas(settings, device)
    if decode_engine_of(settings) == "tensor_cores":
        return decode_prefill_layout(settings, num_ctas)
    return DecodeLayout.from_settings(settings, num_ctas)


def decode_num_ctas(settings: Settings, device: torch.device) -> int:
    """Persistent CTAs of BatchDecode: Settings.num_ctas, else SMs x the resident-CTA count of the
    pipelined kernel's config for these Settings (kernels.tuning.decode_ctas_per_sm: registers at the
    128 budget and its static shared memory, capped at 2 per SM), or for the tensor-core engine SMs x
    its one-warp CTAs' resident count (kernels.tuning.decode_tensor_ctas_per_sm, capped at 4); the
    simulator's small default on CPU. A function of Settings and the device only (never of the
    variant), so workspace_nbytes agrees."""
    if settings.num_ctas is not None or device.type != "cuda":
        return resolve_num_ctas(settings, device)
    return default_num_ctas(device, ctas_per_sm=decode_ctas_per_sm(settings))


def decode_ctas_per_sm(settings: Settings) -> int:
    """CTAs per SM of BatchDecode's default GPU grid for these Settings: its engine's kernel config's
    resident count (the pipeline: kernels.tuning.decode_ctas_per_sm, capped at 2; the tensor-core
    engine: kernels.tuning.decode_tensor_ctas_per_sm, capped at 4)."""
    if decode_engine_of(settings) == "tensor_cores":
        mma = tensor_core_config(DTYPE_CODES[settings.dtype], settings.head_dim, settings.group_size, True, False, short=True)
        return decode_tensor_ctas_per_sm(mma.threads, mma.shared_bytes)
    return pipeline_config(DTYPE_CODES[settings.dtype], settings.head_dim, settings.group_size).ctas_per_sm()


class BatchDecode(AttentionBase):
    """Paged decode attention over a fixed workspace (CUDA-graph safe: launch shapes never change)."""

    OP = define_attention_op("batch_decode")
    kind = "decode"

    def __init__(
        self,
        settings: Settings,
        device: str | torch.device | None = None,
        hooks: AttentionHooks = DEFAULT_HOOKS,
        variant: Variant | None = None,
    ) -> None:
        """``variant``: a tilegraph.Variant (default: plain softmax attention). ``hooks``: raw
        compile-time AttentionHooks without run-time parameters (lower level; not with ``variant``)."""
        if not isinstance(settings, Settings):
            raise InputError(f"settings must be a tilegraph.Settings, got {type(settings).__name__}")
        #: "cuda_cores" (kernels.decode_pipeline on decode plans) or "tensor_cores" (the tensor-core
        #: prefill's one-warp shape on one-token prefill plans)
        self.engine = decode_engine_of(settings)
        self.planners = ENGINE_PLANNERS[self.engine]
        super().__init__(settings, device, hooks, variant)
        self.config = pipeline_config(self.kind_code, settings.head_dim, settings.group_size, self.hooks)
        self.mma_config = None
        if self.engine == "tensor_cores":
            self.mma_config = tensor_core_config(self.kind_code, settings.head_dim, settings.group_size, True, False,
                                                 self.hooks, short=True)  # fmt: skip
            self._no_positions = torch.zeros(1, dtype=torch.int32, device=self.device)

    def make_layout(self) -> DecodeLayout | PrefillLayout:
        # AttentionBase set num_ctas from the shared default just before this call; decode's own default
        # comes from its engine (decode_num_ctas), the same one workspace_nbytes uses
        layout = decode_layout(self.settings, self.device)
        self.num_ctas = layout.num_ctas
        return layout

    @property
    def tensor_cores(self) -> bool:
        """Whether this object runs the tensor-core engine (one-token prefill plans)."""
        return self.engine == "tensor_cores"

    @plan_range
    def plan(self, kv_indptr: Any, kv_indices: Any, kv_last_page_len: Any, padded_batch_size: int | None = None,
             page_table: str = "host") -> Plan | PrefillPlan:  # fmt: skip
        """Validate the page table, balance it over the CTAs and stage it for upload.

        kv_indptr [B+1], kv_indices [nnz_pages], kv_last_page_len [B]: int32 CPU tensors or numpy
        arrays. ``padded_batch_size`` (>= B; the graph runtime's bucket): q/out then have that many
        rows and the rows past B are neither read nor written. The staged plan reaches the device in
        ONE async copy on the stream of the next ``run()`` (or graph replay).

        ``page_table="device"``: kv_indices is an int32 tensor on this object's device that the
        kernels read in place (never copied or read by the host; its address is what a captured
        graph binds). Only kv_indptr and kv_last_page_len are checked here; the kernels guard each
        id against Settings.max_num_pages (``check_page_errors``; Settings.debug_page_table)."""
        self.refuse_while_capturing()
        if page_table not in ("host", "device"):
            raise InputError(f"page_table must be 'host' or 'device', got {page_table!r}")
        flat, pages, serial = None, self.settings.max_num_pages, next_plan_serial()
        if page_table == "device":
            flat, _, _ = device_page_ids(kv_indices, "kv_indices", self.device, block_table=False)
            plan = self.planners.device(self.layout, kv_indptr, kv_last_page_len, flat.numel(), pages, serial)
        else:
            plan = self.planners.host(self.layout, kv_indptr, kv_indices, kv_last_page_len, pages, serial)
        return self.stage_decode_plan(plan, padded_batch_size, page_table, kv_indices, flat)

    @plan_range
    def plan_block_table(self, block_table: torch.Tensor, seq_lens: Any, padded_batch_size: int | None = None) -> Plan | PrefillPlan:
        """Plan from a device block table (vLLM's / SGLang's shape) and host lengths.

        block_table [rows >= B, max_blocks] int32 on this object's device, last dim contiguous: row r
        holds request r's page ids in order; the kernels read it in place (the host never does).
        seq_lens [B]: int32 CPU tensor or numpy array, KV tokens per request (ceil(len / page_size)
        <= max_blocks pages used). Page ids are guarded on the device as with ``page_table="device"``."""
        self.refuse_while_capturing()
        flat, row_stride, max_blocks = device_page_ids(block_table, "block_table", self.device, block_table=True)
        pages, serial = self.settings.max_num_pages, next_plan_serial()
        plan = self.planners.block_table(self.layout, seq_lens, row_stride, max_blocks, flat.numel(), pages, serial)
        return self.stage_decode_plan(plan, padded_batch_size, "block_table", block_table, flat)

    def stage_decode_plan(self, plan: Plan | PrefillPlan, padded_batch_size: int | None, page_table: str, source: Any,
                          flat: torch.Tensor | None) -> Plan | PrefillPlan:  # fmt: skip
        """Make ``plan`` current (its padded rows checked) with the page table it reads, and stage it."""
        rows = padded_rows(padded_batch_size, "padded_batch_size", plan.batch_size, "B",
                           self.settings.max_batch_size, "max_batch_size")  # fmt: skip
        self.use_page_table(page_table if flat is not None else None, source, flat)
        return self.stage_plan(plan, rows)

    def graph_prepare_capture(self, batch_size: int) -> None:
        """A stand-in plan for a bucket: ``batch_size`` one-token requests on page 0."""
        batch_size = check_bucket(batch_size, "batch_size", self.settings.max_batch_size, "max_batch_size")
        if self._page_source is not None:  # a device page table stays bound: empty requests read none of it
            kind, table = self._page_source
            if kind == "block_table":
                self.plan_block_table(table, np.zeros(batch_size, np.int32))
            else:
                self.plan(np.zeros(batch_size + 1, np.int32), table, np.zeros(batch_size, np.int32), page_table="device")
            return
        indptr = np.arange(batch_size + 1, dtype=np.int32)
        self.plan(indptr, np.zeros(batch_size, np.int32), np.ones(batch_size, np.int32))

    def param_context(self) -> ParamContext:
        """The current plan's kv lengths (what encoded variant inputs may depend on)."""
        plan = self._plan
        if plan is None:
            return super().param_context()
        return ParamContext(self.settings, plan.section("kv_len")[: plan.batch_size].copy())

    def check_kv(self, k: Any, v: Any, paired: bool) -> PagedKV:
        return check_paged_kv(k, v, paired, self.settings, self.device, self._plan.max_page_index)

    def q_stride_names(self) -> tuple[tuple[str, int], ...]:
        if self.tensor_cores:  # the prefill kernel's names (q rows are its one-token requests)
            return (("q_stride_n", 0), ("q_stride_h", 1))
        return (("q_stride_b", 0), ("q_stride_h", 1))

    def launch(self, q: torch.Tensor, kv: PagedKV, out: torch.Tensor, lse: torch.Tensor | None) -> None:
        s, hooks = self.settings, self.hooks
        if self.tensor_cores:
            label = f"decode_mma[{s.dtype},hd{s.head_dim},g{s.group_size},{hooks.name}]"
            launch_prefill_kernel(self, prefill_mma_kernel(self.mma_config), self.mma_config.block, label, q, kv, out,
                                  lse, self._no_positions, shared_bytes=self.mma_config.dynamic_shared_bytes)  # fmt: skip
            return
        kernel = decode_pipeline_kernel(self.config)
        label = f"decode_pipeline[{s.dtype},hd{s.head_dim},g{s.group_size},{hooks.name}]"
        merge = (partial_merge_kernel(self.kind_code, hooks), PARTIAL_MERGE_SIGNATURE)
        compile_with_progress(label, [(kernel, DECODE_PIPELINE_ARGS.signature), merge])
        out_words = self.output_words(out)
        lse_arg = lse.view(-1) if lse is not None else self.workspace.no_lse
        values = DECODE_PIPELINE_ARGS.values(**self.plan_sections(DECODE_PIPELINE_ARGS.names),
                                             **self.shared_launch_values(q, kv, out_words, lse_arg, lse is not None),
                                             **self.page_div_values)  # fmt: skip
        launch("decode", kernel, (self.num_ctas,), self.config.block, values)
        self.launch_partial_merge(out_words, lse, prefill=False)


def check_paged_kv(k: Any, v: Any, paired: bool, settings: Settings, device: torch.device, max_page_index: int) -> PagedKV:
    """A paged KV cache (packed, or a pair) checked for Settings and for the plan's highest page."""
    kv = paged_kv((k, v) if paired else k, settings, device)
    if max_page_index >= kv.num_pages:
        raise InputError(f"kv_cache has {kv.num_pages} pages but the plan references page {max_page_index}")
    return kv


__all__ = ["BatchDecode", "DecodePlanners", "ENGINE_PLANNERS", "workspace_nbytes", "resolve_num_ctas", "decode_num_ctas", "decode_ctas_per_sm", "decode_engine_of",
           "decode_layout", "check_paged_kv"]
