"""Tiny random-weight transformers models for the backend's tests (nothing downloaded).

``tiny(arch, **overrides)`` builds a seeded 2-layer model (hidden 64, 4 query / 2 KV heads of 16,
vocab 100) of any architecture in ARCHS, in eval mode; ``hf`` is a namespace of the helpers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tilegraph  # noqa: E402
from tilegraph.integrations import transformers as backend  # noqa: E402

DEVICE = torch.device("cpu" if tilegraph.SIMULATOR else "cuda")
NAME = backend.register()

COMMON = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
# architecture -> (config class, model class, its overrides of COMMON)
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-window": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MOE, sliding_window=None)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=3)),
    "phi3-window": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=3)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gemma2-cap50": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=3, attn_logit_softcapping=50.0, query_pre_attn_scalar=16)),
    "gemma2-cap0.02": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=3, attn_logit_softcapping=0.02, query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=3, query_pre_attn_scalar=16)),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(sliding_window=3)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(sliding_window=3)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=None)),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=16)),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", dict(MOE, head_dim=16, sliding_window=3)),
}

# left padding (what generate() uses) and right padding; 8 positions, windows of 3 bind
LEFT = ([[0, 0, 5, 6, 7, 8, 9, 10], [3, 4, 5, 6, 9, 11, 12, 13], [0, 8, 2, 4, 7, 12, 3, 4]],
        [[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]])  # fmt: skip
RIGHT = ([[5, 6, 7, 8, 9, 0, 0, 0], [3, 4, 5, 6, 9, 11, 12, 13]], [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])


def tiny(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> Any:
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(**(COMMON | extra | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    for module in model.modules():  # GPT-OSS: sink logits of a visible size (they start at zero)
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            with torch.no_grad():
                module.sinks.normal_(0.0, 2.0)
    return model.to(device=DEVICE, dtype=dtype).eval()


def batch(rows: tuple[list[list[int]], list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(rows[0], device=DEVICE), torch.tensor(rows[1], device=DEVICE)


def logits(model: Any, implementation: str, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits.float()


def greedy(model: Any, implementation: str, ids: torch.Tensor, mask: torch.Tensor, new: int, **kwargs: Any) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kwargs)


def paged_cache(model: Any, **kwargs: Any) -> Any:
    model.set_attn_implementation(NAME)
    return backend.TilegraphCache(model.config, max_num_pages=kwargs.pop("max_num_pages", 32), page_size=4, **kwargs)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, tol: float = 1e-4) -> None:
    """Real positions only (padded ones are arbitrary in both): max abs and relative error."""
    real = mask.bool()
    assert torch.isfinite(actual[real]).all()
    error = (actual[real] - expected[real]).abs().max().item()
    scale = expected[real].abs().max().item()
    assert error <= tol * max(scale, 1.0), f"max abs error {error:.3g}, relative {error / scale:.3g}"


def differs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, at_least: float = 1e-3) -> bool:
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item() > at_least


@pytest.fixture
def hf() -> SimpleNamespace:
    return SimpleNamespace(
        NAME=NAME, DEVICE=DEVICE, LEFT=LEFT, RIGHT=RIGHT, ARCHS=ARCHS, backend=backend, tiny=tiny, batch=batch,
        logits=logits, greedy=greedy, paged_cache=paged_cache, assert_logits_close=assert_logits_close, differs=differs,
    )  # fmt: skip


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking ``arch`` runs once per architecture in ARCHS."""
    if "arch" in metafunc.fixturenames:
        metafunc.parametrize("arch", list(ARCHS))
