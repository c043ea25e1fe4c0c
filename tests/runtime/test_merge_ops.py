"""Public merge ops (merge_state, merge_state_in_place, merge_states) against a float64 reference,
and every bad input: a typed InputError naming the argument, raised before any launch."""

from __future__ import annotations

import random
from typing import Any, Callable

import pytest
import torch

from tilegraph.errors import InputError
from tilegraph.kernels import launch as launch_module
from tilegraph.merge import merge_state, merge_state_in_place, merge_states
from tilegraph.serving.reference import relative_error

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
VALUE_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
LSE_TOL = 1e-5
NEG_INF = float("-inf")


def generator() -> tuple[torch.Generator, int]:
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def random_shape(gen: torch.Generator) -> tuple[int, int, int]:
    """Small random (N, H, D), D a multiple of 8."""
    n, heads = (int(x) for x in torch.randint(1, 4, (2,), generator=gen))
    return n, heads, 8 * int(torch.randint(1, 13, (1,), generator=gen))


def random_lse(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """float32 natural-log LSEs over a wide range (exp(s) alone would overflow fp32), some -inf."""
    s = (torch.randn(shape, generator=gen) * 4 + torch.randint(-60, 100, shape, generator=gen)).float()
    s[torch.rand(shape, generator=gen) < 0.2] = NEG_INF
    return s


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
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), dead), f"-inf LSE rows differ (seed {seed})"
    assert torch.all(out.double()[dead] == 0), f"rows without a finite state must be zeros (seed {seed})"
    if (~dead).any():
        err = relative_error(lse[~dead], ref_lse[~dead])
        assert err <= LSE_TOL, f"LSE: relative error {err:.3g} (seed {seed})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_state(dtype: torch.dtype, device: torch.device) -> None:
    gen, seed = generator()
    shape = random_shape(gen)
    v_a, v_b = (torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(2))
    s_a, s_b = (random_lse(shape[:2], gen).to(device) for _ in range(2))
    s_a[0, 0] = s_b[0, 0] = NEG_INF  # a row with no state at all
    v, s = merge_state(v_a, s_a, v_b, s_b)
    assert v.dtype == dtype and v.shape == shape and s.shape == shape[:2]
    ref_v, ref_s = merge_reference(torch.stack([v_a, v_b], dim=2).cpu(), torch.stack([s_a, s_b], dim=2).cpu())
    assert_merged(v.cpu(), s.cpu(), ref_v, ref_s, seed)


def test_merge_state_strided_and_misaligned_inputs(device: torch.device) -> None:
    """Non-contiguous and non-16-byte-aligned inputs are accepted (copied)."""
    gen, seed = generator()
    n, heads, head_dim = 2, 3, 16
    v_a = torch.randn(heads, n, head_dim, generator=gen).half().to(device).transpose(0, 1)
    s_a = random_lse((heads, n), gen).to(device).t()
    v_b = torch.randn(n * heads * head_dim + 1, generator=gen).half().to(device)[1:].view(n, heads, head_dim)
    s_b = random_lse((n, heads), gen).to(device)
    assert not v_a.is_contiguous() and v_b.data_ptr() % 16
    v, s = merge_state(v_a, s_a, v_b, s_b)
    ref_v, ref_s = merge_reference(torch.stack([v_a, v_b], dim=2).cpu(), torch.stack([s_a, s_b], dim=2).cpu())
    assert_merged(v.cpu(), s.cpu(), ref_v, ref_s, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_mask", [False, True], ids=["no-mask", "mask"])
def test_merge_state_in_place(dtype: torch.dtype, use_mask: bool, device: torch.device) -> None:
    gen, seed = generator()
    n, heads, head_dim = 4, 2, 16
    v = torch.randn(n, heads, head_dim, generator=gen).to(dtype).to(device)
    s = random_lse((n, heads), gen).to(device)
    v_other = torch.randn(n, heads, head_dim, generator=gen).to(dtype).to(device)
    s_other = random_lse((n, heads), gen).to(device)
    s[1, 0] = s_other[1, 0] = NEG_INF
    mask = torch.tensor([True, False, True, False], device=device) if use_mask else None
    v_before, s_before = v.clone(), s.clone()
    merge_state_in_place(v, s, v_other, s_other, mask=mask)
    ref_v, ref_s = merge_reference(
        torch.stack([v_before, v_other], dim=2).cpu(), torch.stack([s_before, s_other], dim=2).cpu()
    )
    keep = mask.cpu() if use_mask else torch.ones(n, dtype=torch.bool)
    assert_merged(v.cpu()[keep], s.cpu()[keep], ref_v[keep], ref_s[keep], seed)
    assert torch.equal(v.cpu()[~keep], v_before.cpu()[~keep]), "masked-out rows of v changed"
    assert torch.equal(s.cpu()[~keep], s_before.cpu()[~keep]), "masked-out rows of s changed"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_states", [1, 3])
def test_merge_states(dtype: torch.dtype, num_states: int, device: torch.device) -> None:
    gen, seed = generator()
    n, heads, head_dim = random_shape(gen)
    v = torch.randn(n, num_states, heads, head_dim, generator=gen).to(dtype).to(device)
    s = random_lse((n, num_states, heads), gen).to(device)
    s[0, :, 0] = NEG_INF  # a row with no finite state
    out, lse = merge_states(v, s)
    assert out.shape == (n, heads, head_dim) and out.dtype == dtype and lse.shape == (n, heads)
    ref_v, ref_s = merge_reference(v.transpose(1, 2).cpu(), s.transpose(1, 2).cpu())
    assert_merged(out.cpu(), lse.cpu(), ref_v, ref_s, seed)


def test_merge_states_with_no_states(device: torch.device) -> None:
    out, lse = merge_states(torch.randn(2, 0, 3, 8, device=device), torch.randn(2, 0, 3, device=device))
    assert out.shape == (2, 3, 8) and torch.all(out == 0)
    assert lse.shape == (2, 3) and torch.isneginf(lse).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_states_larger(dtype: torch.dtype, device: torch.device) -> None:
    gen, seed = generator()
    n, num_states, heads, head_dim = 5, 4, 4, 64
    v = torch.randn(n, num_states, heads, head_dim, generator=gen).to(dtype).to(device)
    s = random_lse((n, num_states, heads), gen).to(device)
    out, lse = merge_states(v, s)
    ref_v, ref_s = merge_reference(v.transpose(1, 2).cpu(), s.transpose(1, 2).cpu())
    assert_merged(out.cpu(), lse.cpu(), ref_v, ref_s, seed)


# ---- bad inputs ---------------------------------------------------------------------------------

N, H, D = 2, 3, 16


@pytest.fixture
def no_launch():
    """Fails the test if any kernel launch is attempted."""
    launched: list[str] = []
    previous = launch_module.set_interceptor(lambda record: launched.append(record.name))
    yield launched
    launch_module.set_interceptor(previous)
    assert not launched, f"a kernel was launched although the call failed: {launched}"


def _pair_args(device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "v_a": torch.randn(N, H, D).half().to(device), "s_a": torch.randn(N, H).to(device),
        "v_b": torch.randn(N, H, D).half().to(device), "s_b": torch.randn(N, H).to(device),
    }  # fmt: skip


META = torch.device("meta")
PAIR_CASES: list[tuple[str, Callable[[torch.Tensor], Any], str]] = [
    ("v_a", lambda t: t.cpu().numpy(), "v_a must be a torch.Tensor"),
    ("v_a", lambda t: t[0], "v_a must be 3-D"),
    ("v_b", lambda t: t[:1], "v_b has shape"),
    ("v_b", lambda t: t[:, :, :8], "v_b has shape"),
    ("v_a", lambda t: t.double(), "v_a has dtype torch.float64"),
    ("v_b", lambda t: t.bfloat16(), "v_b has dtype torch.bfloat16 but v_a"),
    ("s_a", lambda t: t.double(), "s_a has dtype torch.float64: LSEs must be float32"),
    ("s_b", lambda t: t[:1], "s_b must have shape"),
    ("s_b", lambda t: t[..., None], "s_b must be 2-D"),
    ("s_a", lambda t: torch.empty(t.shape, device=META), "s_a is on meta"),
]


@pytest.mark.parametrize("name, mutate, match", PAIR_CASES, ids=[f"{c[0]}:{c[2][:30]}" for c in PAIR_CASES])
def test_merge_state_rejects(name, mutate, match, device, no_launch) -> None:
    args = _pair_args(device)
    args[name] = mutate(args[name])
    with pytest.raises(InputError, match=match):
        merge_state(args["v_a"], args["s_a"], args["v_b"], args["s_b"])


def test_merge_state_rejects_head_dim_not_multiple_of_8(device, no_launch) -> None:
    v = torch.randn(N, H, 12).half().to(device)
    with pytest.raises(InputError, match="head_dim 12: it must be a positive multiple of 8"):
        merge_state(v, torch.randn(N, H).to(device), v.clone(), torch.randn(N, H).to(device))


IN_PLACE_CASES: list[tuple[str, Callable[[torch.Tensor], Any], str]] = [
    ("v_other", lambda t: t.float(), "v_other has dtype torch.float32 but v"),
    ("v_other", lambda t: t[:, :2], "v_other has shape"),
    ("s_other", lambda t: t.half(), "s_other has dtype torch.float16"),
    ("s", lambda t: t[:, :2], "s must have shape"),
    ("mask", lambda t: t.int(), "mask has dtype torch.int32"),
    ("mask", lambda t: t[:1], "mask has length 1"),
    ("mask", lambda t: t[None], "mask must be 1-D"),
    ("v", lambda t: t.transpose(0, 1).contiguous().transpose(0, 1), "v is written in place, so it must be contiguous"),
    ("s", lambda t: t.t().contiguous().t(), "s is written in place, so it must be contiguous"),
    ("v", lambda t: torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t), "16-byte aligned"),
    ("v_other", lambda t: torch.empty(t.shape, dtype=t.dtype, device=META), "v_other is on meta"),
]


@pytest.mark.parametrize("name, mutate, match", IN_PLACE_CASES, ids=[f"{c[0]}:{c[2][:30]}" for c in IN_PLACE_CASES])
def test_merge_state_in_place_rejects(name, mutate, match, device, no_launch) -> None:
    args = {
        "v": torch.full((N, H, D), float("nan")).half().to(device), "s": torch.full((N, H), float("nan")).to(device),
        "v_other": torch.randn(N, H, D).half().to(device), "s_other": torch.randn(N, H).to(device),
        "mask": torch.tensor([True, True], device=device),
    }  # fmt: skip
    args[name] = mutate(args[name])
    with pytest.raises(InputError, match=match):
        merge_state_in_place(args["v"], args["s"], args["v_other"], args["s_other"], mask=args["mask"])
    assert torch.isnan(args["v"].float()).all() and torch.isnan(args["s"]).all(), "a target was written"


STATES_CASES: list[tuple[str, Callable[[torch.Tensor], Any], str]] = [
    ("v", lambda t: t[0], "v must be 4-D"),
    ("v", lambda t: t.to(torch.int16), "v has dtype torch.int16"),
    ("v", lambda t: t[..., :4], "head_dim 4"),
    ("s", lambda t: t[:, :1], "s must have shape"),
    ("s", lambda t: t.double(), "s has dtype torch.float64"),
    ("s", lambda t: t.tolist(), "s must be a torch.Tensor"),
]


@pytest.mark.parametrize("name, mutate, match", STATES_CASES, ids=[f"{c[0]}:{c[2][:30]}" for c in STATES_CASES])
def test_merge_states_rejects(name, mutate, match, device, no_launch) -> None:
    args = {"v": torch.randn(N, 2, H, D).half().to(device), "s": torch.randn(N, 2, H).to(device)}
    args[name] = mutate(args[name])
    with pytest.raises(InputError, match=match):
        merge_states(args["v"], args["s"])
