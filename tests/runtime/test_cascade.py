"""CascadeAttention on the simulator (or a GPU) against float64 flat attention over the concatenated KV.

Covering set: 2 and 3 levels, groups of one request and of many, empty prefixes and empty suffixes,
decode rows and multi-row requests, the causal last level, padded rows, every dtype, NHD/HND and
pair caches. Then the bad-input discipline: every error names its argument, is raised before
anything is staged or written, and a failed plan() leaves the previous plan in force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph.cascade import CascadeAttention, LevelTable
from tilegraph.serving.reference import attention_reference, gather_kv, relative_error

TOLERANCE = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 1e-4}
BASE = dict(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, max_batch_size=8, max_num_pages=96,
            max_num_tokens=32, num_ctas=2)  # fmt: skip


def build_levels(requests, prefix_levels, page_size, pool_pages, rng):
    """requests [(qo_len, suffix_len)]; prefix_levels: per shared level, its groups as
    [(consecutive requests, prefix_len)]. Returns (LevelTables, per request [(pages, kv_len)] level
    by level); every entry's pages are distinct random pages of the pool, stored once."""
    free = iter(rng.permutation(pool_pages).tolist())
    specs = []
    for groups in prefix_levels:
        start, entries = 0, []
        for count, kv_len in groups:
            entries.append((range(start, start + count), kv_len))
            start += count
        specs.append(entries)
    specs.append([(range(r, r + 1), kv_len) for r, (_, kv_len) in enumerate(requests)])
    tables, seen = [], [[] for _ in requests]
    for entries in specs:
        qo, indptr, indices, last = [0], [0], [], []
        for members, kv_len in entries:
            pages = [next(free) for _ in range(-(-kv_len // page_size))]
            qo.append(qo[-1] + sum(requests[m][0] for m in members))
            indices += pages
            indptr.append(len(indices))
            last.append((kv_len - 1) % page_size + 1 if kv_len else int(rng.integers(0, 99)))  # ignored when empty
            for m in members:
                seen[m].append((pages, kv_len))
        tables.append(LevelTable(*(np.array(a, np.int32) for a in (qo, indptr, indices, last))))
    return tables, seen


def flat_reference(q, cache, settings, requests, seen, causal):
    """float64 (out, lse): each request's rows attend the concatenation of its levels' KV."""
    outs, lses, start = [], [], 0
    for (qo_len, _), levels in zip(requests, seen):
        parts = [gather_kv(cache, settings, torch.as_tensor(pages, dtype=torch.long), kv_len) for pages, kv_len in levels]
        k, v = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        offset = k.shape[0] - qo_len if causal else None
        out, lse = attention_reference(q[start : start + qo_len], k, v, settings.sm_scale, offset)
        outs.append(out)
        lses.append(lse)
        start += qo_len
    return torch.cat(outs), torch.cat(lses)


def make_cache(settings, device, pair=False):
    ps, hkv, hd, n = settings.page_size, settings.num_kv_heads, settings.head_dim, settings.max_num_pages
    inner = (ps, hkv, hd) if settings.kv_layout == "NHD" else (hkv, ps, hd)
    if pair:
        return tuple(torch.randn(n, *inner).to(settings.torch_dtype).to(device) for _ in range(2))
    return torch.randn(n, 2, *inner).to(settings.torch_dtype).to(device)


def check(out, lse, ref_out, ref_lse, dtype, context):
    assert relative_error(out, ref_out) < TOLERANCE[dtype], context
    finite = torch.isfinite(ref_lse)
    assert relative_error(lse.cpu()[finite], ref_lse[finite]) < 1e-4, context
    assert torch.isneginf(lse.cpu()[~finite]).all(), context


CASES = [
    # id, settings overrides, requests [(qo_len, suffix_len)], prefix levels, causal, pair cache
    ("f16-2lv-one-group-decode-empty-suffix", dict(dtype="float16"),
        [(1, 5), (1, 0), (1, 9), (1, 1)], [[(4, 13)]], False, False),
    ("bf16-HND-2lv-groups-of-1-and-many-empty-prefix", dict(dtype="bfloat16", kv_layout="HND"),
        [(3, 2), (1, 6), (2, 0), (1, 4), (2, 3)], [[(3, 10), (1, 0), (1, 7)]], False, False),
    ("f16-3lv-nested-groups", dict(dtype="float16"),
        [(1, 3), (2, 5), (1, 0), (1, 2), (3, 4)], [[(5, 9)], [(2, 6), (2, 0), (1, 5)]], False, True),
    ("f32-2lv-causal-last-level", dict(dtype="float32", num_qo_heads=2, num_kv_heads=1),
        [(3, 5), (1, 1), (4, 4), (2, 7)], [[(2, 11), (2, 6)]], True, False),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cascade_matches_flat_attention(case, device):
    _, overrides, requests, prefix_levels, causal, pair = case
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**{**BASE, **overrides})
    tables, seen = build_levels(requests, prefix_levels, settings.page_size, settings.max_num_pages, rng)
    cache = make_cache(settings, device, pair)
    rows = int(tables[-1].qo_indptr[-1])
    q = torch.randn(rows, settings.num_qo_heads, settings.head_dim).to(settings.torch_dtype).to(device)
    cascade = CascadeAttention(settings, num_levels=len(tables), causal=causal, device=device)
    plan = cascade.plan(tables)
    assert plan.kv_tokens < plan.flat_kv_tokens, plan  # the shared prefixes are read once
    out, lse = cascade.run(q, cache, return_lse=True)
    check(out, lse, *flat_reference(q, cache, settings, requests, seen, causal), settings.dtype, plan)


def test_padded_rows_out_and_all_empty_rows(device):
    """3 levels into a NaN-poisoned ``out`` with padded rows: rows past the real ones are neither
    read (NaN q) nor written; a request with no KV at any level gets zeros and LSE -inf."""
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**{**BASE, "dtype": "float16"})
    requests = [(2, 3), (1, 0), (1, 5)]
    tables, seen = build_levels(requests, [[(2, 0), (1, 6)], [(1, 4), (1, 0), (1, 0)]], 4, 96, rng)
    cache = make_cache(settings, device)
    q = torch.randn(7, 4, 16).half().to(device)
    q[4:] = float("nan")
    cascade = CascadeAttention(settings, num_levels=3, device=device)
    cascade.plan(tables, padded_num_tokens=7)
    out = torch.full((7, 4, 16), float("nan"), dtype=torch.float16, device=device)
    got, lse = cascade.run(q, cache, out=out, return_lse=True)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isnan(out[4:].cpu()).all(), "a padded row was written"
    assert (out[2].cpu() == 0).all() and torch.isneginf(lse[2].cpu()).all()
    check(out[:4], lse[:4], *flat_reference(q[:4], cache, settings, requests, seen, False), "float16", "padded")


# ---- bad input -----------------------------------------------------------------------------------

SETTINGS = tilegraph.Settings(**{**BASE, "max_cascade_groups": 2, "max_cascade_levels": 3})


def good_tables():
    """3 requests (1 row each), level 0: groups of 2 and 1."""
    t0 = LevelTable(*(np.array(a, np.int32) for a in ([0, 2, 3], [0, 2, 3], [0, 1, 2], [4, 3])))
    t1 = LevelTable(*(np.array(a, np.int32) for a in ([0, 1, 2, 3], [0, 1, 1, 2], [5, 6], [2, 7, 1])))
    return [t0, t1]


def replace(tables, level, **fields):
    old = tables[level]
    values = {name: np.array(fields.get(name, getattr(old, name)), np.int32) for name in LevelTable.__dataclass_fields__}
    return [LevelTable(**values) if i == level else t for i, t in enumerate(tables)]


BAD_PLANS = [
    ("wrong-level-count", lambda t: t[:1], tilegraph.InputError, r"levels has 1 page tables"),
    ("not-a-table", lambda t: [t[0], "pages"], tilegraph.InputError, r"levels\[1\] must be a LevelTable"),
    ("int64", lambda t: [t[0], LevelTable(t[1].qo_indptr.astype(np.int64), *list(vars(t[1]).values())[1:])],
        tilegraph.InputError, r"levels\[1\]\.qo_indptr must be int32"),
    ("request-in-no-group", lambda t: replace(t, 0, qo_indptr=[0, 1, 2]), tilegraph.InputError,
        r"levels\[0\]\.qo_indptr ends at row 2 .* request 2 .* is in no group"),
    ("rows-past-requests", lambda t: replace(t, 0, qo_indptr=[0, 2, 4]), tilegraph.InputError,
        r"levels\[0\]\.qo_indptr ends at row 4, past"),
    ("inconsistent-groups", lambda t: replace(t, 1, qo_indptr=[0, 1, 3, 3]), tilegraph.InputError,
        r"levels\[0\]\.qo_indptr\[1\]=2 cuts through entry 1 of levels\[1\]"),
    ("kv-indptr-length", lambda t: replace(t, 1, kv_indptr=[0, 1, 2]), tilegraph.InputError,
        r"levels\[1\]\.kv_indptr has 3 entries but levels\[1\]\.qo_indptr has 4"),
    ("last-page-len-length", lambda t: replace(t, 0, kv_last_page_len=[4]), tilegraph.InputError,
        r"levels\[0\]\.kv_last_page_len has 1 entries"),
    ("qo-decreasing", lambda t: replace(t, 1, qo_indptr=[0, 2, 1, 3]), tilegraph.InputError,
        r"levels\[1\]\.qo_indptr must be non-decreasing"),
    ("too-many-groups", lambda t: replace(t, 0, qo_indptr=[0, 1, 2, 3], kv_indptr=[0, 1, 2, 3], kv_last_page_len=[1, 1, 1]),
        tilegraph.PlanError, r"levels\[0\] has 3 groups > max_cascade_groups=2"),
    ("too-many-rows", lambda t: replace(replace(t, 0, qo_indptr=[0, 32, 33]), 1, qo_indptr=[0, 1, 32, 33]), tilegraph.PlanError,
        r"levels\[-1\]\.qo_indptr\[-1\]=33 query rows exceed max_num_tokens=32"),
    ("page-out-of-pool", lambda t: replace(t, 1, kv_indices=[5, 96]), tilegraph.InputError,
        r"levels\[1\]: kv_indices\[1\]=96 is outside"),
    ("last-page-len-range", lambda t: replace(t, 0, kv_last_page_len=[5, 3]), tilegraph.InputError,
        r"levels\[0\]: kv_last_page_len\[0\]=5"),
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_PLANS, ids=[b[0] for b in BAD_PLANS])
def test_bad_plan_names_the_argument_and_keeps_the_previous_plan(bad, device):
    _, mutate, error, pattern = bad
    cascade = CascadeAttention(SETTINGS, num_levels=2, device=device)
    previous = cascade.plan(good_tables())
    state = cascade.graph_plan_state()
    with pytest.raises(error, match=pattern):
        cascade.plan(mutate(good_tables()))
    assert cascade.current_plan is previous
    assert [level.current_plan for level in cascade.levels] == list(previous.levels)
    assert cascade.graph_plan_state() == state


def test_bounds_and_order(device):
    with pytest.raises(tilegraph.PlanError, match="max_cascade_levels=3"):
        CascadeAttention(SETTINGS, num_levels=4, device=device)
    with pytest.raises(tilegraph.InputError, match="num_levels"):
        CascadeAttention(SETTINGS, num_levels=0, device=device)
    cascade = CascadeAttention(SETTINGS, num_levels=2, device=device)
    q = torch.randn(3, 4, 16).half().to(device)
    with pytest.raises(tilegraph.StateError, match="before plan"):
        cascade.run(q, make_cache(SETTINGS, device))
    with pytest.raises(tilegraph.PlanError, match="padded_num_tokens=2"):
        cascade.plan(good_tables(), padded_num_tokens=2)
    with pytest.raises(tilegraph.PlanError, match="max_num_tokens"):
        cascade.plan(good_tables(), padded_num_tokens=33)
    causal = CascadeAttention(SETTINGS, num_levels=2, causal=True, device=device)
    causal.plan(good_tables())  # request 1 has 1 row over an empty suffix: allowed (tests/runtime/test_cascade_reliability.py)
    cascade.graph_set_capturing(True)
    with pytest.raises(tilegraph.StateError, match="capture"):
        cascade.plan(good_tables())
    cascade.graph_set_capturing(False)


@pytest.mark.parametrize(
    "what, pattern",
    [("q-rows", "q has 4 query tokens"), ("cache-too-small", r"kv_cache has 6 pages but the plan references page 6"),
     ("out-shape", "out must have shape")],
)  # fmt: skip
def test_bad_run_writes_nothing(device, what, pattern):
    """Checked before the first level launches: ``out`` keeps its poison."""
    cascade = CascadeAttention(SETTINGS, num_levels=2, device=device)
    cascade.plan(good_tables())
    q = torch.randn(4 if what == "q-rows" else 3, 4, 16).half().to(device)
    cache = make_cache(SETTINGS, device)[:6] if what == "cache-too-small" else make_cache(SETTINGS, device)
    out = torch.full((3, 4, 16) if what != "out-shape" else (3, 4, 8), float("nan"), dtype=torch.float16, device=device)
    with pytest.raises(tilegraph.InputError, match=pattern):
        cascade.run(q, cache, out=out)
    assert torch.isnan(out.cpu()).all()


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_cascade_larger_slow(device, causal):
    """Many requests under one long prefix, a middle level of uneven groups, split tiles (4 CTAs)."""
    rng = np.random.default_rng()
    settings = tilegraph.Settings(**{**BASE, "num_ctas": 4, "max_num_pages": 256, "max_num_tokens": 64})
    requests = [(int(rng.integers(1, 4)), int(rng.integers(3, 12))) for _ in range(8)]
    prefix_levels = [[(8, 150)], [(3, 20), (1, 0), (4, 9)]]
    tables, seen = build_levels(requests, prefix_levels, 4, 256, rng)
    cache = make_cache(settings, device)
    q = torch.randn(int(tables[-1].qo_indptr[-1]), 4, 16).half().to(device)
    cascade = CascadeAttention(settings, num_levels=3, causal=causal, device=device)
    plan = cascade.plan(tables)
    out, lse = cascade.run(q, cache, return_lse=True)
    check(out, lse, *flat_reference(q, cache, settings, requests, seen, causal), "float16", plan)


def test_bench_smoke_runs_and_refuses_without_smoke(tmp_path, capsys):
    from tilegraph.tools.bench.cascade import main

    rows = main(["--smoke", "--out", str(tmp_path)])
    assert {(r["mode"], r["impl"]) for r in rows} == {(m, i) for m in ("eager", "graph") for i in ("cascade", "flat-decode")}
    for row in rows:
        assert row["kv_bytes"] > 0 and row["median_us"] > 0
        if row["impl"] == "cascade":
            assert row["rel_err"] < 4e-3 and row["kv_bytes"] < next(r["kv_bytes"] for r in rows if r["impl"] == "flat-decode")
    assert (tmp_path / "cascade.json").exists()
    if not tilegraph.SIMULATOR:
        return
    with pytest.raises(SystemExit) as refused:
        main(["--out", str(tmp_path / "refused")])
    assert refused.value.code == 3 and "bench cascade needs a CUDA GPU" in capsys.readouterr().err


def test_all_levels_reach_the_device_in_one_copy(monkeypatch):
    """One plan() of every level, then run(): exactly one host-to-device copy of plan words."""
    from tilegraph.workspace import StagedUpload

    copies = []
    original = StagedUpload.flush

    def counting_flush(self):
        if self._pending is not None:
            copies.append(self)
        original(self)

    monkeypatch.setattr(StagedUpload, "flush", counting_flush)
    device = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
    settings = tilegraph.Settings(num_qo_heads=2, num_kv_heads=1, head_dim=16, page_size=4, dtype="float32",
                                  max_batch_size=4, max_num_pages=16, max_num_tokens=8, num_ctas=2)  # fmt: skip
    cascade = tilegraph.CascadeAttention(settings, num_levels=3, device=device)
    i32 = lambda *v: np.array(v, np.int32)  # noqa: E731
    levels = [
        tilegraph.LevelTable(i32(0, 2), i32(0, 2), i32(0, 1), i32(4)),           # one group, 8 shared tokens
        tilegraph.LevelTable(i32(0, 1, 2), i32(0, 1, 1), i32(2), i32(3, 1)),     # a sub-prefix for request 0
        tilegraph.LevelTable(i32(0, 1, 2), i32(0, 1, 2), i32(3, 4), i32(2, 1)),  # suffixes
    ]
    cascade.plan(levels)
    cache = torch.randn(16, 2, 4, 1, 16, device=device)
    cascade.run(torch.randn(2, 2, 16, device=device), cache)
    assert len(copies) == 1 and copies[0] is cascade._upload
