"""Bad variants and bad variant parameters: clear typed errors, raised before anything launches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import tilegraph
from tilegraph import InputError, StateError, VariantError
from tilegraph import variants as V

SETTINGS = tilegraph.Settings(num_qo_heads=4, num_kv_heads=2, head_dim=16, page_size=4, max_batch_size=2,
                              max_num_pages=16, num_ctas=2, max_custom_mask_bits=48)  # fmt: skip


def _logits_too_few(score, request, qo_pos, kv_pos, qo_head):
    return score


def _logits_unknown_param(score, request, qo_pos, kv_pos, qo_head, kv_head, params, nope):
    return score


def _logits_star(score, *rest):
    return score


def _logits_undefined_name(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    return score * undefined_global_name  # noqa: F821


def _logits_returns_none(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
    return None


def _vec_raises(vals, dim0, request, head, pos, params):
    raise_me = vals[100]  # out of bounds: an 8-element array
    vals[0] = raise_me


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(logits_transform=_logits_too_few), ["_logits_too_few", "takes 5 arguments"]),
        (dict(logits_transform=_logits_unknown_param), ["_logits_unknown_param", "'nope' is not a declared parameter"]),
        (dict(logits_transform=_logits_star), ["_logits_star", "plain positional"]),
        (dict(logits_transform=_logits_undefined_name), ["_logits_undefined_name", "does not compile"]),
        (dict(logits_transform=_logits_returns_none), ["_logits_returns_none"]),
        (dict(key_transform=_vec_raises), ["key_transform hook '_vec_raises'", "does not compile"]),
        (dict(logits_mask=42), ["logits_mask", "not a Python function"]),
        (dict(sink=V.attention_sinks()._hooks["sink"][0][0], params={"sinks": "qo_head"}, softmax=False), ["sink needs softmax"]),
        (dict(params=[V.Param("a"), V.Param("a")]), ["'a'", "declared twice"]),
        (dict(params={"not an identifier": "scalar"}), ["not an identifier"]),
    ],
    ids=["arity", "unknown-param", "star-args", "undefined-name", "returns-none", "raises", "not-callable",
         "sink-without-softmax", "duplicate-param", "bad-param-name"],  # fmt: skip
)
def test_bad_variant_raises_at_construction(kwargs, words):
    with pytest.raises(VariantError) as info:
        tilegraph.Variant("bad", **kwargs)
    assert isinstance(info.value, InputError)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_combine_rejects_clashes():
    with pytest.raises(VariantError, match="declared twice"):
        V.combine(V.soft_cap(), V.soft_cap())
    with pytest.raises(VariantError, match="softmax"):
        V.combine(V.soft_cap(), V.sigmoid_attention())


def _planned(variant, device, lengths=(5, 3)):
    dec = tilegraph.BatchDecode(SETTINGS, variant=variant, device=device)
    counts = [-(-n // 4) for n in lengths]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    last = np.array([(n - 1) % 4 + 1 for n in lengths], np.int32)
    dec.plan(indptr, np.arange(indptr[-1], dtype=np.int32), last)
    q = torch.randn(len(lengths), 4, 16).half().to(device)
    cache = torch.randn(16, 2, 4, 2, 16).half().to(device)
    return dec, q, cache


@pytest.mark.parametrize(
    "variant, params, error, words",
    [
        (V.attention_sinks(), None, InputError, ["needs params ['sinks']"]),
        (V.soft_cap(), {"cap": 3.0}, InputError, ["['cap'] unknown", "logits_soft_cap"]),
        (V.soft_cap(), {"logits_soft_cap": [1.0, 2.0]}, InputError, ["must hold a scalar, got 2"]),
        (V.alibi(), {"alibi_slopes": torch.ones(3)}, InputError, ["4 values (num_qo_heads), got 3"]),
        (V.soft_cap(), {"logits_soft_cap": float("nan")}, InputError, ["NaN"]),
        (V.soft_cap(), {"logits_soft_cap": "big"}, InputError, ["not numeric"]),
        (V.custom_mask(), {"custom_mask": np.ones(7, bool)}, InputError, ["7 bits", "sum to 8"]),
        (V.custom_mask(), {"custom_mask": np.ones(3, np.uint8)}, InputError, ["3 bytes", "needs 2"]),
        (V.custom_mask(), {"custom_mask": np.ones(8, np.int32)}, InputError, ["bool", "uint8"]),
    ],
    ids=["missing", "unknown", "scalar-size", "head-size", "nan", "not-numeric", "mask-bits", "mask-bytes", "mask-dtype"],
)
def test_bad_params_raise_before_launch(device, variant, params, error, words):
    dec, q, cache = _planned(variant, device)
    before = dec.params.clone()
    out = torch.full_like(q, float("nan"))
    with pytest.raises(error) as info:
        dec.run(q, cache, out=out, params=params)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert torch.isnan(out).all() and torch.equal(dec.params, before)


def test_custom_mask_capacity(device):
    dec, q, cache = _planned(V.custom_mask(), device, lengths=(30, 30))
    with pytest.raises(InputError, match="max_custom_mask_bits is 48"):
        dec.set_params({"custom_mask": np.ones(60, bool)})


def test_custom_mask_needs_a_plan(device):
    dec = tilegraph.BatchDecode(SETTINGS, variant=V.custom_mask(), device=device)
    with pytest.raises(StateError, match="plan"):
        dec.set_params({"custom_mask": np.ones(3, bool)})


def test_softmax_free_has_no_lse(device):
    dec, q, cache = _planned(V.sigmoid_attention(), device)
    with pytest.raises(InputError, match="softmax-free"):
        dec.run(q, cache, return_lse=True)


def test_variant_and_hooks_exclusive(device):
    from tilegraph.kernels.compile_spec import DECODE_CHECK_HOOKS as CHECK_HOOKS

    with pytest.raises(InputError, match="either variant= or hooks="):
        tilegraph.BatchDecode(SETTINGS, variant=V.soft_cap(), hooks=CHECK_HOOKS, device=device)
    with pytest.raises(InputError, match="tilegraph.Variant"):
        tilegraph.BatchDecode(SETTINGS, variant=CHECK_HOOKS, device=device)


def test_bad_hook_rejected_by_numba_typing_on_gpu_build(tmp_path):
    """Without the simulator (a GPU build; no driver needed), hooks are typed by numba at Variant
    construction: one that works in plain Python but not in numba is refused, naming the hook."""
    script = tmp_path / "bad_hook.py"
    script.write_text(textwrap.dedent("""
        import tilegraph
        assert not tilegraph.SIMULATOR
        def dict_hook(score, request, qo_pos, kv_pos, qo_head, kv_head, params):
            return score + {"a": 1.0}["a"] * {}
        try:
            tilegraph.Variant("bad", logits_transform=dict_hook)
        except tilegraph.VariantError as exc:
            print("REFUSED", exc)
        tilegraph.Variant("good", logits_transform=lambda s, r, qp, kp, qh, kh, p: s * 2)
        print("GOOD")
    """))
    env = {**os.environ, "TILEGRAPH_SIMULATOR": "0"}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED variant 'bad': logits_transform hook 'dict_hook' does not compile" in proc.stdout, proc.stdout
    assert "GOOD" in proc.stdout
