"""transformers' generate() on tilegraph: a small random-weight model (nothing downloaded), greedy
tokens with transformers' eager attention, then with the tilegraph backend over the default dynamic
cache, the static cache and tilegraph's paged cache. The tokens match.

    pip install "tilegraph[transformers]"
    python examples/hf_generate.py             # Llama; the simulator on a CPU, or a GPU when there is one
    python examples/hf_generate.py --arch gemma2    # soft-capped logits, alternating sliding-window layers
    python examples/hf_generate.py --arch gpt-oss   # attention sinks (s_aux) + sliding windows
    python examples/hf_generate.py --layers 8 --hidden 1024 --new-tokens 32    # bigger, on a GPU
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import tilegraph
from tilegraph.integrations.transformers import TilegraphCache, register


ARCHS = {  # name -> (config class, model class, what it adds to a Llama-like config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": 4, "attn_logit_softcapping": 50.0}),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", {"sliding_window": 4, "num_local_experts": 4, "num_experts_per_tok": 2}),
}


def build_model(arch: str, layers: int, hidden: int, device: str) -> torch.nn.Module:
    """Random weights; 4 query heads of 16 at the default size (head_dim 64 from hidden 256 up), half as many KV heads."""
    heads = max(hidden // 64, 4)
    config_name, model_name, extra = ARCHS[arch]
    config = getattr(transformers, config_name)(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads // 2, head_dim=hidden // heads, pad_token_id=0, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for module in model.modules():  # GPT-OSS's sinks start at zero: give them visible values
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.normal_(0.0, 1.0)
    return model.to(device).eval()


def left_padded_prompts(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [[17, 42, 9], [5, 88, 23, 61, 7, 30], [99, 3, 14, 15]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def generate(
    model: torch.nn.Module, implementation: str, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, cache: str
) -> tuple[torch.Tensor, float]:
    """The new tokens and the seconds generate() took; ``cache``: "dynamic", "static" or "paged"."""
    model.set_attn_implementation(implementation)
    extra: dict = {"cache": TilegraphCache(model.config, max_num_pages=256, page_size=16)} if cache == "paged" else {}
    if cache == "static":
        extra["cache_implementation"] = "static"
    start = time.perf_counter()
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **extra)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return tokens[:, ids.shape[1] :], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=3)
    args = parser.parse_args()
    device = "cpu" if tilegraph.SIMULATOR else "cuda"
    name = register()
    model = build_model(args.arch, args.layers, args.hidden, device)
    ids, mask = left_padded_prompts(device)
    runs = {
        "eager": generate(model, "eager", ids, mask, args.new_tokens, cache="dynamic"),
        "tilegraph (dynamic cache)": generate(model, name, ids, mask, args.new_tokens, cache="dynamic"),
        "tilegraph (static cache)": generate(model, name, ids, mask, args.new_tokens, cache="static"),
        "tilegraph (paged cache)": generate(model, name, ids, mask, args.new_tokens, cache="paged"),
    }
    where = "the numba CUDA simulator (timings are not speed)" if tilegraph.SIMULATOR else torch.cuda.get_device_name()
    print(f"{args.arch}: greedy generate() of {args.new_tokens} tokens for 3 left-padded prompts on {where}:")
    expected = runs["eager"][0]
    for label, (tokens, seconds) in runs.items():
        verdict = "same tokens" if torch.equal(tokens, expected) else "DIFFERENT tokens"
        print(f"  {label:26s} {seconds * 1e3:8.1f} ms  {verdict}: {tokens.tolist()}")
    if not all(torch.equal(tokens, expected) for tokens, _ in runs.values()):
        raise SystemExit("the tilegraph backend's tokens differ from eager attention's")


if __name__ == "__main__":
    main()
