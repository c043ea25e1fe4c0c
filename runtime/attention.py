"""``AttentionBase``: what every graph-aware attention object shares (decode, prefill, ragged prefill).

A subclass supplies its plan layout, its ``plan()`` and ``graph_prepare_capture()``, how it checks
its K/V arguments, and its kernel launch; the base owns everything else, once:

* Settings, device, the variant (compiled into kernel hooks) and its fixed float32 params buffer;
* the fixed workspace (plan tables + fp32 partials) and the staged ONE-copy plan upload;
* the graph protocol (tilegraph.graphs.protocol.GraphAware) with ONE plan-serial counter and ONE
  handle registry for every graph-aware object, so plans of different kinds order in one sequence;
* the run prologue (plan present, params written, LSE available, outputs allocated) and the
  custom-op dispatch: ``run()`` calls ``torch.ops.tilegraph.<op>`` whose implementation looks the
  object up by handle and calls ``run_checked`` (every check, then the launch).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from tilegraph._device import default_num_ctas, resolve_device
from tilegraph.errors import InputError, PageTableError, PlanError, StateError
from tilegraph.graphs.protocol import PlanState
from tilegraph.kernels import primitives as prim
from tilegraph.kernels.decode_pipeline import page_divisor
from tilegraph.kernels.hooks import DEFAULT_HOOKS, AttentionHooks
from tilegraph.kernels.launch import as_words
from tilegraph.kernels.tuning import PARTIAL_MERGE_CTAS
from tilegraph.planner.layout import H_NUM_PAGES, H_PAGE_ERROR

from .checks import check_on_device, check_out, check_q, span_words
from .kv_cache import KVCache, PagedKV
from .settings import Settings
from .variant import DEFAULT, ParamContext, Variant
from .workspace import StagedUpload, Workspace

_plan_serials = itertools.count(1)
_handles = itertools.count(1)
_instances: "weakref.WeakValueDictionary[int, AttentionBase]" = weakref.WeakValueDictionary()


def next_plan_serial() -> int:
    """A new plan serial, from the one counter every graph-aware object numbers its plans with
    (a graph replay refuses a plan whose serial it has already replayed)."""
    return next(_plan_serials)


def instance(handle: int) -> "AttentionBase":
    """The attention object behind a custom op's ``handle`` (StateError once it was collected)."""
    obj = _instances.get(handle)
    if obj is None:
        raise StateError(f"the attention object behind handle {handle} no longer exists")
    return obj


def resolve_num_ctas(settings: Settings, device: torch.device) -> int:
    """Persistent CTAs of the attention kernels: Settings.num_ctas, else a function of the device."""
    return settings.num_ctas if settings.num_ctas is not None else default_num_ctas(device)


def padded_rows(value: Any, arg: str, real_rows: int, real_label: str, max_rows: int, max_label: str) -> int:
    """The q/out rows of a plan: ``real_rows`` when ``value`` is None, else the integer ``value`` in
    [real_rows, max_rows] (InputError for a non-integer, PlanError outside the range)."""
    if value is None:
        return real_rows
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{arg} must be an integer or None, got {value!r}")
    if value < real_rows or value > max_rows:
        raise PlanError(f"{arg}={value} must lie in [{real_label}={real_rows}, {max_label}={max_rows}]")
    return int(value)


def device_page_ids(table: Any, name: str, device: torch.device, block_table: bool) -> tuple[torch.Tensor, int, int]:
    """A caller's device page table as the flat int32 view the kernels read, with (row_stride,
    max_blocks): a CSR ``kv_indices`` [nnz] (contiguous; row_stride and max_blocks 0) or a block
    table [rows, max_blocks] whose last dim is contiguous (request r's ids at r * row_stride).
    InputError naming ``name`` otherwise. The host never reads the ids."""
    if not isinstance(table, torch.Tensor):
        raise InputError(f"{name} must be an int32 torch.Tensor on {device}, got {type(table).__name__}")
    if table.dtype is not torch.int32:
        raise InputError(f"{name} must be int32, got {table.dtype}")
    if table.device != device:
        raise InputError(f"{name} must live on {device} (the kernels read it there), got {table.device}")
    if not block_table:
        if table.dim() != 1 or (table.numel() > 1 and table.stride(0) != 1):
            raise InputError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(table.shape)} strides {table.stride()}")
        return table, 0, 0
    if table.dim() != 2 or (table.shape[1] > 1 and table.stride(1) != 1) or table.stride(0) < table.shape[1]:
        raise InputError(f"{name} must be 2-D [rows, max_blocks] with a contiguous last dim, got shape "
                         f"{tuple(table.shape)} strides {table.stride()}")  # fmt: skip
    rows, cols = table.shape
    row_stride = table.stride(0) if rows > 1 else cols
    span = (rows - 1) * row_stride + cols if rows and cols else 0
    if span >= 2**31:
        raise InputError(f"{name} spans {span} int32 ids, more than 2^31 - 1 (int32 page-id offsets)")
    return torch.as_strided(table, (span,), (1,)), int(row_stride), int(cols)


def page_divisor_values(page_size: int) -> dict[str, np.int64]:
    """The page_div_magic / page_div_shift launch arguments of ``page_size``
    (kernels.decode_pipeline.page_divisor: the kernels' page index without a division)."""
    magic, shift = page_divisor(page_size)
    return {"page_div_magic": np.int64(magic), "page_div_shift": np.int64(shift)}


def split_kv_cache(kv_cache: Any) -> tuple[Any, Any, bool]:
    """(k, v, paired): a (k_cache, v_cache) pair apart, or one packed cache twice."""
    if isinstance(kv_cache, (tuple, list)) and len(kv_cache) == 2:
        return kv_cache[0], kv_cache[1], True
    return kv_cache, kv_cache, False


def define_attention_op(name: str, with_paired: bool = True) -> Callable[..., None]:
    """Register ``torch.ops.tilegraph.<name>(handle, q, k, v, paired, out, lse, return_lse)`` (without
    ``paired`` when ``with_paired`` is False: k and v are always separate tensors). It mutates ``out``
    and ``lse`` and has a fake implementation, so torch.compile traces it whole."""
    if with_paired:

        def impl(handle: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, paired: bool,
                 out: torch.Tensor, lse: torch.Tensor, return_lse: bool) -> None:  # fmt: skip
            instance(handle).run_checked(q, k, v, paired, out, lse, return_lse)

        op = torch.library.custom_op(f"tilegraph::{name}", impl, mutates_args=("out", "lse"))
        op.register_fake(lambda handle, q, k, v, paired, out, lse, return_lse: None)
        return op

    def impl_separate(handle: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, return_lse: bool) -> None:  # fmt: skip
        instance(handle).run_checked(q, k, v, True, out, lse, return_lse)

    separate = torch.library.custom_op(f"tilegraph::{name}", impl_separate, mutates_args=("out", "lse"))
    separate.register_fake(lambda handle, q, k, v, out, lse, return_lse: None)
    return lambda handle, q, k, v, paired, out, lse, return_lse: separate(handle, q, k, v, out, lse, return_lse)


class AttentionBase:
    """One fixed-workspace attention object (CUDA-graph safe: buffers and launch shapes never change)."""

    #: the custom op run() dispatches through (set by each subclass: define_attention_op(...))
    OP: ClassVar[Callable[..., None]]
    #: what this object is in plan keys and labels, e.g. "decode", "prefill:paged:causal"
    kind: str = "attention"

    def __init__(
        self,
        settings: Settings,
        device: str | torch.device | None = None,
        hooks: AttentionHooks = DEFAULT_HOOKS,
        variant: Variant | None = None,
        plan_upload: tuple[StagedUpload, int] | None = None,
    ) -> None:
        if not isinstance(settings, Settings):
            raise InputError(f"settings must be a tilegraph.Settings, got {type(settings).__name__}")
        if variant is not None and hooks is not DEFAULT_HOOKS:
            raise InputError("pass either variant= or hooks=, not both")
        if variant is not None and not isinstance(variant, Variant):
            raise InputError(f"variant must be a tilegraph.Variant, got {type(variant).__name__}")
        if not isinstance(hooks, AttentionHooks):
            raise InputError(f"hooks must be a tilegraph.kernels.hooks.AttentionHooks, got {type(hooks).__name__}")
        self.settings = settings
        self.device = resolve_device(device)
        self.variant = variant if variant is not None else DEFAULT
        self.hooks = variant.decode_hooks(settings) if variant is not None else hooks
        self.kind_code = prim.DTYPE_CODES[settings.dtype]
        #: the page_div_magic / page_div_shift launch arguments, computed once (every paged kernel takes them)
        self.page_div_values = page_divisor_values(settings.page_size)
        self.num_ctas = resolve_num_ctas(settings, self.device)
        self.layout = self.make_layout()
        self.workspace = Workspace(self.layout, self.device, upload=plan_upload)
        self.param_layout = self.variant.param_layout(settings)
        # the variant's run-time parameters: one fixed float32 buffer (graph replays read it in place)
        self.params = torch.zeros(self.param_layout.total, dtype=torch.float32, device=self.device)
        self._plan: Any = None
        self._rows = 0  # q/out rows the current plan expects (its batch / tokens, or the padded bucket)
        self._capturing = False
        # the caller's device page table the current plan reads ("device" | "block_table", tensor as
        # given) and the flat view the kernels take as kv_indices; None: the plan's own copy (host path)
        self._page_source: tuple[str, torch.Tensor] | None = None
        self._page_ids: torch.Tensor | None = None
        self._guard_bound = settings.max_num_pages  # the page-id bound in the device header now
        defaults, self._missing_params = self.variant.defaults(settings)
        self._write_params(defaults)
        self._handle = next(_handles)
        _instances[self._handle] = self

    # ---- what a subclass provides --------------------------------------------------------------

    def make_layout(self) -> Any:
        """The plan layout (sections and workspace bytes) of this kind under self.settings / num_ctas."""
        raise NotImplementedError

    def check_kv(self, k: Any, v: Any, paired: bool) -> PagedKV:
        """run()'s K/V arguments checked against the current plan, as kernel word views."""
        raise NotImplementedError

    def launch(self, q: torch.Tensor, kv: PagedKV, out: torch.Tensor, lse: torch.Tensor | None) -> None:
        """The attention launch (and the partial merge after it) for the current plan; no checks."""
        raise NotImplementedError

    def graph_prepare_capture(self, rows: int) -> None:
        """Plan a valid stand-in batch with ``rows`` q/out rows (for warm-up and capture)."""
        raise NotImplementedError

    # ---- plan state ----------------------------------------------------------------------------

    @property
    def workspace_nbytes(self) -> int:
        return self.layout.workspace_nbytes

    @property
    def current_plan(self) -> Any:
        """The plan the next run() (or graph replay) executes; None before the first plan()."""
        return self._plan

    @property
    def rows(self) -> int:
        """q/out rows the current plan expects: its batch (decode) or query tokens (prefill), or the
        padded bucket it was made for; 0 before the first plan()."""
        return self._rows

    @property
    def handle(self) -> int:
        """This object's key in the custom ops' registry (what ``torch.ops.tilegraph.*`` take first)."""
        return self._handle

    @property
    def capturing(self) -> bool:
        return self._capturing

    def refuse_while_capturing(self, what: str = "plan()") -> None:
        if self._capturing:
            raise StateError(f"{what} was called while a CUDA graph capture is in progress: plan before capturing or replaying")

    def stage_plan(self, plan: Any, rows: int) -> Any:
        """Make ``plan`` current with ``rows`` q/out rows (see ``padded_rows``) and stage it for the
        next upload (one copy on the stream of the next run or replay)."""
        self.workspace.stage_ranges(plan.buffer, plan.live_ranges())  # only the words the kernels read
        self._guard_bound = self.settings.max_num_pages  # what the staged header holds
        self._plan, self._rows = plan, int(rows)
        return plan

    def use_page_table(self, kind: str | None, source: torch.Tensor | None, flat: torch.Tensor | None) -> None:
        """Make the kernels read page ids from ``flat`` (a view of the caller's ``source``, of page
        table ``kind``) instead of the plan's own copy; ``None``: the plan's copy (host path)."""
        self._page_source = (kind, source) if kind is not None and source is not None else None
        self._page_ids = flat if self._page_source is not None else None

    @property
    def page_table(self) -> torch.Tensor | None:
        """The caller's device page table the current plan reads (None: the plan's host-copied one)."""
        return self._page_source[1] if self._page_source is not None else None

    def check_page_errors(self) -> None:
        """Read the kernels' page-id guard word (a host sync) and raise PageTableError naming a
        request whose device page id lay outside [0, num_pages) since the last check; the word is
        then cleared. Runs after every step when Settings.debug_page_table is set."""
        header = self.workspace.sections["header"]
        word = int(header[H_PAGE_ERROR].item())
        if word == 0:
            return
        header[H_PAGE_ERROR] = 0
        bound = int(header[H_NUM_PAGES].item())
        raise PageTableError(f"request {word - 1}: its device page table holds a page id outside [0, num_pages={bound}); "
                             f"the kernels did not read those tokens (its output is not valid)", word - 1)  # fmt: skip

    def graph_after_replay(self) -> None:
        """After a replay: the debug page-id check (Settings.debug_page_table), else nothing."""
        if self.settings.debug_page_table:
            self.check_page_errors()

    def has_work(self) -> bool:
        """Whether the current plan launches anything (an empty batch launches nothing)."""
        return bool(self._plan.batch_size)

    # ---- graph protocol (tilegraph.graphs.protocol.GraphAware) ---------------------------------

    def graph_set_capturing(self, capturing: bool) -> None:
        self._capturing = bool(capturing)

    def graph_buffers(self) -> dict[str, torch.Tensor]:
        ws = self.workspace
        return {"plan": ws.plan_words, "partial_out": ws.partial_out, "partial_lse": ws.partial_lse,
                "no_lse": ws.no_lse, "no_params": ws.no_params, "params": self.params,
                **({"page_table": self._page_ids} if self._page_ids is not None else {})}  # fmt: skip

    def graph_plan_state(self) -> PlanState:
        serial = self._plan.serial if self._plan is not None else 0
        address = self._page_ids.data_ptr() if self._page_ids is not None else 0
        return PlanState(serial=serial, padded_batch_size=self._rows, key=self.plan_key, page_table_address=address)

    def graph_before_replay(self) -> None:
        self.workspace.flush()

    def graph_max_rows(self) -> tuple[int, str]:
        """The most q/out rows a plan of this object has, and the Settings field bounding them."""
        if self.kind == "decode":
            return self.settings.max_batch_size, "max_batch_size"
        return self.settings.max_num_tokens, "max_num_tokens"  # prefill rows are query tokens

    @property
    def plan_key(self) -> str:
        """Identifies the kind, Settings and variant a plan was made under (a replay compares it)."""
        prefix = "" if self.kind == "decode" else f"{self.kind}|"
        return f"{prefix}{self.settings.model_dump_json()}|{self.hooks.name}"

    # ---- variant parameters --------------------------------------------------------------------

    @property
    def missing_params(self) -> list[str]:
        """Required variant parameters not given yet (run() refuses to launch while any is missing)."""
        return list(self._missing_params)

    def param_context(self) -> ParamContext:
        """What encoded variant inputs may depend on: the current plan's kv lengths (and, for
        prefill, query lengths). StateError before the first plan()."""
        raise StateError("this parameter depends on the plan: call plan() first")

    def check_params(self, params: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``params`` checked and encoded into flat float32 tensors by name; writes nothing."""
        if not isinstance(params, dict):
            raise InputError(f"params must be a dict of name -> value, got {type(params).__name__}")
        encoded = self.variant.encode(params, self.param_context)
        return {n: self.variant.check_value(n, v, self.settings, self.param_layout) for n, v in encoded.items()}

    def set_params(self, params: dict[str, Any]) -> None:
        """Write variant parameters into the fixed params buffer (on the current stream); they
        persist until set again. Checked first: nothing is written when any value is wrong."""
        self.refuse_while_capturing("set_params() (or run(params=...))")
        self.write_checked_params(self.check_params(params))

    def write_checked_params(self, checked: dict[str, torch.Tensor]) -> None:
        """Write values returned by ``check_params`` (of this object) into the params buffer."""
        for name, t in checked.items():
            offset = self.param_layout.offset(name)
            self.params[offset : offset + t.numel()].copy_(t.to(self.device))
        self._missing_params = [n for n in self._missing_params if n not in checked]

    def _write_params(self, values: dict[str, Any]) -> None:
        checked = {n: self.variant.check_value(n, v, self.settings, self.param_layout) for n, v in values.items()}
        self.write_checked_params(checked)

    # ---- run -----------------------------------------------------------------------------------

    def prepare_run(self, params: dict[str, Any] | None, return_lse: bool) -> None:
        """run()'s first checks: a plan exists, ``params`` are written, no required one is missing,
        and an LSE exists when ``return_lse`` asks for it."""
        if self._plan is None:
            raise StateError("run() was called before plan(): plan the batch first")
        if params is not None:
            self.set_params(params)
        if self._missing_params:
            raise InputError(f"variant {self.variant.name!r} needs params {self._missing_params}: pass run(..., params={{...}})")
        if return_lse and not self.hooks.softmax:
            raise InputError(f"return_lse=True: variant {self.variant.name!r} is softmax-free and has no LSE")

    def new_outputs(self, out: torch.Tensor | None, return_lse: bool) -> tuple[Any, torch.Tensor]:
        """``out`` (allocated [rows, Hq, D] when None) and the LSE buffer ([rows, Hq], or [0, Hq])."""
        s = self.settings
        if out is None:
            out = torch.empty((self._rows, s.num_qo_heads, s.head_dim), dtype=s.torch_dtype, device=self.device)
        lse = torch.empty((self._rows if return_lse else 0, s.num_qo_heads), dtype=torch.float32, device=self.device)
        return out, lse

    def check_q(self, q: Any) -> torch.Tensor:
        """q [rows, num_qo_heads, head_dim] for the current plan (may be a strided, aligned view)."""
        label = "B" if self.kind == "decode" else "nnz_q"
        mismatch = ("q has batch size {got} but the plan was made for {want} requests" if self.kind == "decode" else
                    "q has {got} query tokens but the plan was made for {want} (qo_indptr[-1] or padded_num_tokens)")  # fmt: skip
        return check_q(q, self.settings, self.device, self._rows, label, mismatch)

    def check_out(self, out: Any) -> torch.Tensor:
        """out [rows, num_qo_heads, head_dim], contiguous and 16-byte aligned, for the current plan."""
        return check_out(out, self.settings, self.device, self._rows)

    def run(
        self,
        q: torch.Tensor,
        kv_cache: KVCache,
        out: torch.Tensor | None = None,
        return_lse: bool = False,
        params: dict[str, Any] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention of ``q`` [rows, num_qo_heads, head_dim] over the planned pages of ``kv_cache``
        (rows: the plan's requests for decode, its query tokens for prefill, or its padded bucket).

        q may be a strided view (e.g. sliced from a fused QKV projection) whose last dim is contiguous
        and whose pointer and strides are 16-byte aligned. ``kv_cache``: NHD/HND 5-D or a (k, v) pair
        (tilegraph.kv_cache). Returns ``out`` [rows, num_qo_heads, head_dim] (Settings dtype; written
        in place when given) and, with ``return_lse``, the natural-log LSE float32 [rows,
        num_qo_heads]. Runs as the class's custom op (``torch.ops.tilegraph.batch_decode`` /
        ``batch_prefill``; torch.compile traces it whole). ``params``: the variant's run-time
        parameters (``set_params``; they persist)."""
        k, v, paired = split_kv_cache(kv_cache)
        return self.dispatch(q, k, v, paired, out, return_lse, params, ("q", "kv_cache", "kv_cache"))

    def dispatch(self, q: Any, k: Any, v: Any, paired: bool, out: Any, return_lse: bool,
                 params: dict[str, Any] | None, names: tuple[str, str, str]) -> Any:  # fmt: skip
        """The body of every run(): prologue, outputs, then the custom op (which checks and launches).
        ``names``: how the caller calls q, k and v (in errors)."""
        if not isinstance(return_lse, bool):
            raise InputError(f"return_lse must be a bool, got {return_lse!r}")
        self.prepare_run(params, return_lse)
        out, lse = self.new_outputs(out, return_lse)
        named = ((names[0], q), (names[1], k), (names[2], v), ("out", out))
        bad = next((n for n, t in named if not isinstance(t, torch.Tensor)), None)
        if bad is not None:
            hint = " (or, for kv_cache, a (k_cache, v_cache) pair of them)" if bad == "kv_cache" else ""
            raise InputError(f"{bad} must be a torch.Tensor{hint}")
        check_on_device(dict(named), self.device)  # before the op: a meta tensor would reach its fake
        type(self).OP(self._handle, q, k, v, paired, out, lse, return_lse)
        return (out, lse) if return_lse else out

    def run_checked(self, q: Any, k: Any, v: Any, paired: bool, out: Any, lse: torch.Tensor, return_lse: bool) -> None:
        """Validate everything, then launch (the custom op's implementation)."""
        q = self.check_q(q)
        kv = self.check_kv(k, v, paired)
        out = self.check_out(out)
        if not self._capturing:
            self.workspace.flush()
        bound = min(kv.num_pages, self.settings.max_num_pages)
        if self._page_ids is not None and bound != self._guard_bound:
            # the guard's bound: the pages of this cache (after the upload, on the same stream; captured too)
            self.workspace.sections["header"][H_NUM_PAGES] = bound
            self._guard_bound = bound
        if self.has_work():
            self.launch(q, kv, out, lse if return_lse else None)
            if self.settings.debug_page_table and not self._capturing and self._page_ids is not None:
                self.check_page_errors()

    # ---- launch helpers ------------------------------------------------------------------------

    def shared_launch_values(self, q: torch.Tensor, kv: PagedKV, out_words: torch.Tensor, lse_arg: torch.Tensor,
                             write_lse: bool) -> dict[str, Any]:  # fmt: skip
        """The launch arguments decode and prefill kernels share, by name (see kernels.args)."""
        s, ws = self.settings, self.workspace
        words_per_elem = q.element_size() / 4
        return dict(
            q_words=span_words(q), k_words=kv.k_words, v_words=kv.v_words,
            page_stride=np.int64(kv.page_stride), token_stride=np.int64(kv.token_stride),
            head_stride=np.int64(kv.head_stride), page_size=np.int64(s.page_size),
            out_words=out_words, lse=lse_arg, write_lse=np.int32(write_lse),
            partial_out=ws.partial_out, partial_lse=ws.partial_lse, sm_scale=np.float32(s.sm_scale),
            num_qo_heads=np.int64(s.num_qo_heads), params=self.params,
            **{name: np.int64(q.stride(dim) * words_per_elem) for name, dim in self.q_stride_names()},
        )  # fmt: skip

    def q_stride_names(self) -> tuple[tuple[str, int], ...]:
        """(kernel argument name, q dim) of the two q strides the kernel takes."""
        raise NotImplementedError

    def plan_sections(self, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The device views of the plan sections among ``names`` (a kernel's argument names)."""
        sections = self.workspace.sections
        found = {name: sections[name] for name in names if name in sections}
        if self._page_ids is not None and "kv_indices" in found:
            found["kv_indices"] = self._page_ids  # a device page table: the caller's tensor
        return found

    def launch_partial_merge(self, out_words: torch.Tensor, lse: torch.Tensor | None, prefill: bool) -> None:
        """The partial merge over this object's plan (fixed grid; live merges read on the device)."""
        ws = self.workspace
        lse_arg = lse.view(-1) if lse is not None else ws.no_lse
        ws.launch_merge(self.settings, self.kind_code, self.hooks, self.params, out_words, lse_arg,
                        lse is not None, PARTIAL_MERGE_CTAS, prefill=prefill)  # fmt: skip

    @staticmethod
    def output_words(out: torch.Tensor) -> torch.Tensor:
        return as_words(out)


__all__ = ["AttentionBase", "define_attention_op", "device_page_ids", "instance", "next_plan_serial", "padded_rows",
           "page_divisor_values", "resolve_num_ctas"]
