"""Merge kernels against a float64 reference: pair, S-states, and the split-KV decode partial merge.

Outputs are poisoned with NaN before each launch, so an element a kernel should write but does not
shows up, and an element it must leave alone is checked to still be NaN.
"""

from __future__ import annotations

import random

import pytest
import torch

from tilegraph.kernels import merge as km
from tilegraph.kernels import primitives as prim
from tilegraph.kernels.launch import as_words
from tilegraph.planner.layout import H_NUM_MERGES, DecodeLayout
from tilegraph.serving.reference import relative_error

DTYPES = {"float16": (torch.float16, prim.F16), "bfloat16": (torch.bfloat16, prim.BF16), "float32": (torch.float32, prim.F32)}
VALUE_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
LSE_TOL = 1e-5
NEG_INF = float("-inf")


def generator() -> tuple[torch.Generator, int]:
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def random_lse(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """float32 natural-log LSEs spread over a wide range (so exp(s) alone would overflow fp32)."""
    return (torch.randn(shape, generator=gen) * 4 + torch.randint(-60, 100, shape, generator=gen)).float()


def merge_reference(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 merge over dim -2 of v [..., K, D] with natural LSEs s [..., K] -> ([..., D], [...])."""
    v, s = v.double(), s.double()
    m = s.max(dim=-1).values
    alive = m > NEG_INF
    m_safe = torch.where(alive, m, torch.zeros_like(m))
    w = torch.exp(s - m_safe[..., None])
    w_sum = w.sum(dim=-1)
    out = (w[..., None] * v).sum(dim=-2) / torch.where(alive, w_sum, torch.ones_like(w_sum))[..., None]
    lse = torch.where(alive, m_safe + torch.log(w_sum), torch.full_like(m, NEG_INF))
    return out, lse


def assert_merged(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor, seed: int) -> None:
    err = relative_error(out, ref_out)
    assert err <= VALUE_TOL[out.dtype], f"values: relative error {err:.3g} (seed {seed})"
    dead = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), dead), f"-inf LSE rows differ (seed {seed})"
    assert torch.all(out.double()[dead] == 0), f"rows without a finite state must be zeros (seed {seed})"
    err = relative_error(lse[~dead], ref_lse[~dead])
    assert err <= LSE_TOL, f"LSE: relative error {err:.3g} (seed {seed})"


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_pair_kernel(dtype_name: str) -> None:
    dtype, kind = DTYPES[dtype_name]
    gen, seed = generator()
    n, heads, head_dim = 3, 2, 16
    a = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
    b = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
    a_lse, b_lse = random_lse((n, heads), gen), random_lse((n, heads), gen)
    a_lse[0, 0] = NEG_INF  # only b counts
    b_lse[1, 1] = NEG_INF  # only a counts
    a_lse[2, 0] = b_lse[2, 0] = NEG_INF  # nothing counts
    out = torch.full((n, heads, head_dim), float("nan"), dtype=dtype)
    out_lse = torch.full((n, heads), float("nan"))
    km.launch_pair(kind, a, a_lse, b, b_lse, out, out_lse, None)
    ref_out, ref_lse = merge_reference(torch.stack([a, b], dim=2), torch.stack([a_lse, b_lse], dim=2))
    assert_merged(out, out_lse, ref_out, ref_lse, seed)


def test_pair_kernel_in_place_with_mask() -> None:
    """out aliases a (values and LSE), 6 lanes per row: no lane may read an LSE another already wrote."""
    gen, seed = generator()
    n, heads, head_dim = 3, 2, 48
    a = torch.randn(n, heads, head_dim, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, heads, head_dim, generator=gen).to(torch.bfloat16)
    a_lse, b_lse = random_lse((n, heads), gen), random_lse((n, heads), gen)
    a_before, a_lse_before = a.clone(), a_lse.clone()
    mask = torch.tensor([1, 0, 1], dtype=torch.uint8)
    km.launch_pair(prim.BF16, a, a_lse, b, b_lse, a, a_lse, mask)
    ref_out, ref_lse = merge_reference(torch.stack([a_before, b], dim=2), torch.stack([a_lse_before, b_lse], dim=2))
    keep = mask.bool()
    assert_merged(a[keep], a_lse[keep], ref_out[keep], ref_lse[keep], seed)
    assert torch.equal(a[1], a_before[1]) and torch.equal(a_lse[1], a_lse_before[1]), "masked-out row changed"


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_states_kernel(dtype_name: str) -> None:
    dtype, kind = DTYPES[dtype_name]
    gen, seed = generator()
    n, num_states, heads, head_dim = 2, 3, 3, 8
    v = torch.randn(n, num_states, heads, head_dim, generator=gen).to(dtype)
    lse = random_lse((n, num_states, heads), gen)
    lse[0, :, 1] = NEG_INF
    lse[1, 0, 2] = NEG_INF
    out = torch.full((n, heads, head_dim), float("nan"), dtype=dtype)
    out_lse = torch.full((n, heads), float("nan"))
    km.launch_states(kind, v, lse, out, out_lse)
    ref_out, ref_lse = merge_reference(v.transpose(1, 2), lse.transpose(1, 2))
    assert_merged(out, out_lse, ref_out, ref_lse, seed)


@pytest.mark.slow
def test_states_kernel_wide_head_dim() -> None:
    """head_dim / 8 > 32 lanes: each lane merges several 8-element vectors."""
    gen, seed = generator()
    n, num_states, heads, head_dim = 1, 2, 2, 8 * (km.MAX_LANES + 3)
    v = torch.randn(n, num_states, heads, head_dim, generator=gen).half()
    lse = random_lse((n, num_states, heads), gen)
    out = torch.full((n, heads, head_dim), float("nan"), dtype=torch.float16)
    out_lse = torch.full((n, heads), float("nan"))
    km.launch_states(prim.F16, v, lse, out, out_lse)
    ref_out, ref_lse = merge_reference(v.transpose(1, 2), lse.transpose(1, 2))
    assert_merged(out, out_lse, ref_out, ref_lse, seed)


# ---- split-KV decode partial merge -------------------------------------------------------------

LAYOUT = DecodeLayout(
    num_ctas=2, max_batch_size=3, max_page_refs=8, page_size=4, num_kv_heads=2, group_size=2, head_dim=16,
    deterministic=False,
)  # fmt: skip
NUM_QO_HEADS = LAYOUT.num_kv_heads * LAYOUT.group_size
# (request, kv_head, slots): live entries, then one stale entry past num_merges that must be ignored
MERGES = [(0, 1, [0, 1, 2]), (2, 0, [3, 4]), (1, 1, [5, 6, 7])]
STALE = (1, 0, [0, 1])


def build_plan() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A plan buffer with MERGES live (header num_merges = 3) and STALE written after them."""
    plan = torch.full((LAYOUT.plan_words,), -7, dtype=torch.int32)
    sections = {name: plan[start:stop] for name, (start, stop) in LAYOUT.offsets().items()}
    assert len(MERGES) + 1 <= LAYOUT.merge_capacity
    indptr = [0]
    for m, (request, kv_head, slots) in enumerate([*MERGES, STALE]):
        sections["merge_request"][m] = request
        sections["merge_kv_head"][m] = kv_head
        indptr.append(indptr[-1] + len(slots))
    sections["merge_slot_indptr"][: len(indptr)] = torch.tensor(indptr, dtype=torch.int32)
    sections["header"][:] = 0
    sections["header"][H_NUM_MERGES] = len(MERGES)
    return plan, sections


def run_partial_merge(dtype: torch.dtype, kind: int, write_lse: bool, gen: torch.Generator):
    plan, sec = build_plan()
    slots, group, head_dim = LAYOUT.slot_capacity, LAYOUT.group_size, LAYOUT.head_dim
    partial_out = torch.randn(slots * group * head_dim, generator=gen)
    partial_lse = random_lse((slots * group,), gen)
    partial_lse[1 * group + 0] = NEG_INF  # merge 0, j 0: one dead slot of three
    partial_lse[3 * group + 1] = partial_lse[4 * group + 1] = NEG_INF  # merge 1, j 1: every slot dead
    out = torch.full((LAYOUT.max_batch_size, NUM_QO_HEADS, head_dim), float("nan"), dtype=dtype)
    lse = torch.full((LAYOUT.max_batch_size, NUM_QO_HEADS), float("nan"))
    km.launch_partial_merge(
        kind=kind, head_dim=head_dim, group_size=group, header=sec["header"],
        merge_slot_indptr=sec["merge_slot_indptr"], merge_request=sec["merge_request"],
        merge_kv_head=sec["merge_kv_head"], partial_out=partial_out, partial_lse=partial_lse,
        out_words=as_words(out), lse=lse.view(-1), write_lse=write_lse, num_qo_heads=NUM_QO_HEADS, grid=2,
    )  # fmt: skip
    return out, lse, partial_out.view(slots, group, head_dim), partial_lse.view(slots, group)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_partial_merge(dtype_name: str) -> None:
    dtype, kind = DTYPES[dtype_name]
    gen, seed = generator()
    out, lse, partial_out, partial_lse = run_partial_merge(dtype, kind, write_lse=True, gen=gen)
    written = torch.zeros(out.shape[:2], dtype=torch.bool)
    for request, kv_head, slots in MERGES:
        heads = slice(kv_head * LAYOUT.group_size, (kv_head + 1) * LAYOUT.group_size)
        ref_out, ref_lse = merge_reference(partial_out[slots].transpose(0, 1), partial_lse[slots].transpose(0, 1))
        assert_merged(out[request, heads], lse[request, heads], ref_out, ref_lse, seed)
        written[request, heads] = True
    assert torch.isnan(out[~written]).all(), "rows no live merge entry names were written (stale entry?)"
    assert torch.isnan(lse[~written]).all(), "LSEs no live merge entry names were written (stale entry?)"


def test_partial_merge_without_lse() -> None:
    gen, seed = generator()
    out, lse, partial_out, partial_lse = run_partial_merge(torch.float16, prim.F16, write_lse=False, gen=gen)
    request, kv_head, slots = MERGES[2]
    heads = slice(kv_head * LAYOUT.group_size, (kv_head + 1) * LAYOUT.group_size)
    ref_out, _ = merge_reference(partial_out[slots].transpose(0, 1), partial_lse[slots].transpose(0, 1))
    err = relative_error(out[request, heads], ref_out)
    assert err <= VALUE_TOL[torch.float16], f"relative error {err:.3g} (seed {seed})"
    assert torch.isnan(lse).all(), "write_lse=False but the LSE output was written"


def test_compile_specs_cover_every_dtype_and_kernel() -> None:
    names = {spec.name for spec in km.gpu_compile_specs()}
    for kernel in ("merge_pair", "merge_states", "partial_merge"):
        for dtype_name in DTYPES:
            assert f"{kernel}[{dtype_name}]" in names
