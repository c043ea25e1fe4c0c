"""Float64 references: what every kernel is checked against (slow, simple, obviously right)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tilegraph.settings import Settings


def gather_kv(kv_cache, settings: Settings, pages: np.ndarray, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one request as float64 [kv_len, num_kv_heads, head_dim]."""
    if isinstance(kv_cache, (tuple, list)):
        k_pages, v_pages = kv_cache[0][pages], kv_cache[1][pages]
    else:
        k_pages, v_pages = kv_cache[pages, 0], kv_cache[pages, 1]
    if settings.kv_layout == "HND":  # [n, Hkv, ps, D] -> [n, ps, Hkv, D]
        k_pages, v_pages = k_pages.transpose(1, 2), v_pages.transpose(1, 2)
    shape = (-1, settings.num_kv_heads, settings.head_dim)
    k = k_pages.reshape(shape)[:kv_len].double().cpu()
    v = v_pages.reshape(shape)[:kv_len].double().cpu()
    return k, v


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, causal_offset: int | None = None):
    """q [n, Hq, D], k/v [L, Hkv, D] -> (out [n, Hq, D], lse [n, Hq]) in float64, natural-log LSE.

    causal_offset: query i sees kv positions <= causal_offset + i (None: all). Empty rows: 0, -inf."""
    q, k, v = q.double().cpu(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) * sm_scale
    if causal_offset is not None:
        qi = torch.arange(q.shape[0])[:, None]
        kj = torch.arange(k.shape[0])[None, :]
        scores = scores.masked_fill(kj > causal_offset + qi, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, n]
    weights = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hnl,lhd->nhd", weights, v)
    return out, lse.transpose(0, 1)


def decode_reference(q: torch.Tensor, kv_cache, settings: Settings, kv_indptr, kv_indices, kv_last_page_len):
    """Paged decode in float64: q [B, Hq, D] -> (out [B, Hq, D], lse [B, Hq])."""
    kv_indptr, kv_indices, last = (np.asarray(a) for a in (kv_indptr, kv_indices, kv_last_page_len))
    outs, lses = [], []
    for r in range(len(kv_indptr) - 1):
        pages = kv_indices[kv_indptr[r] : kv_indptr[r + 1]]
        kv_len = 0 if len(pages) == 0 else (len(pages) - 1) * settings.page_size + int(last[r])
        k, v = gather_kv(kv_cache, settings, torch.as_tensor(pages, dtype=torch.long), kv_len)
        out, lse = attention_reference(q[r : r + 1], k, v, settings.sm_scale)
        outs.append(out)
        lses.append(lse)
    if not outs:
        return torch.zeros(0, *q.shape[1:], dtype=torch.float64), torch.zeros(0, q.shape[1], dtype=torch.float64)
    return torch.cat(outs), torch.cat(lses)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, tiny); NaN anywhere in actual gives inf."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    if torch.isnan(actual).any():
        return float("inf")
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-30)
    return (actual - expected).abs().max().item() / scale if expected.numel() else 0.0


def dense_llama_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    """The same model in float64 over a whole sequence, dense causal attention: logits [T, vocab]."""
    cfg, w = model.config, model.weights
    hq, hkv, d = cfg.num_qo_heads, cfg.num_kv_heads, cfg.head_dim
    n = len(tokens)
    h = w.embed.double().cpu()[torch.tensor(tokens)]
    cos, sin = (t.double().cpu()[:n, None, :] for t in (model.rope_cos, model.rope_sin))

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * weight.double().cpu()

    for layer in w.layers:
        qkv = norm(h, layer.attn_norm) @ layer.wqkv.double().cpu().T
        q = rope(qkv[:, : hq * d].view(n, hq, d))
        k = rope(qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d))
        v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
        out, _ = attention_reference(q, k, v, d**-0.5, causal_offset=0)
        h = h + out.reshape(n, -1) @ layer.wo.double().cpu().T
        gate, up = (norm(h, layer.mlp_norm) @ layer.w_gate_up.double().cpu().T).chunk(2, dim=-1)
        h = h + (torch.nn.functional.silu(gate) * up) @ layer.w_down.double().cpu().T
    return norm(h, w.final_norm) @ w.lm_head.double().cpu().T
