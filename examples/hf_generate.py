"""transformers' generate() on tilegraph: a small random-weight Llama (nothing downloaded), greedy
tokens with transformers' sdpa attention, then with the tilegraph backend over the default dynamic
cache and over tilegraph's paged cache. The tokens match.

    pip install "tilegraph[transformers]"
    python examples/hf_generate.py             # the simulator on a CPU, or a GPU when there is one
    python examples/hf_generate.py --layers 8 --hidden 1024 --new-tokens 32    # bigger, on a GPU
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tilegraph
from tilegraph.integrations.transformers import TilegraphCache, register


def build_model(layers: int, hidden: int, device: str) -> LlamaForCausalLM:
    """Random weights; 4 query heads of 16 at the default size (head_dim 64 from hidden 256 up), half as many KV heads."""
    heads = max(hidden // 64, 4)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device).eval()


def left_padded_prompts(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [[17, 42, 9], [5, 88, 23, 61, 7, 30], [99, 3, 14, 15]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def generate(
    model: LlamaForCausalLM, implementation: str, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, paged: bool
) -> tuple[torch.Tensor, float]:
    """The new tokens and the seconds generate() took."""
    model.set_attn_implementation(implementation)
    extra = {"cache": TilegraphCache(model.config, max_num_pages=256, page_size=16)} if paged else {}
    start = time.perf_counter()
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **extra)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return tokens[:, ids.shape[1] :], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=3)
    args = parser.parse_args()
    device = "cpu" if tilegraph.SIMULATOR else "cuda"
    name = register()
    model = build_model(args.layers, args.hidden, device)
    ids, mask = left_padded_prompts(device)
    runs = {
        "sdpa": generate(model, "sdpa", ids, mask, args.new_tokens, paged=False),
        "tilegraph (dynamic cache)": generate(model, name, ids, mask, args.new_tokens, paged=False),
        "tilegraph (paged cache)": generate(model, name, ids, mask, args.new_tokens, paged=True),
    }
    where = "the numba CUDA simulator (timings are not speed)" if tilegraph.SIMULATOR else torch.cuda.get_device_name()
    print(f"greedy generate() of {args.new_tokens} tokens for 3 left-padded prompts on {where}:")
    expected = runs["sdpa"][0]
    for label, (tokens, seconds) in runs.items():
        verdict = "same tokens" if torch.equal(tokens, expected) else "DIFFERENT tokens"
        print(f"  {label:26s} {seconds * 1e3:8.1f} ms  {verdict}: {tokens.tolist()}")
    if not all(torch.equal(tokens, expected) for tokens, _ in runs.values()):
        raise SystemExit("the tilegraph backend's tokens differ from sdpa's")


if __name__ == "__main__":
    main()
