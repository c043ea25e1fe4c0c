"""Greedy generation on a tiny random-weight Llama with one vLLM attention backend; prints the tokens
as JSON (run in a subprocess per backend by test_end_to_end.py: one vLLM engine per process)."""

import json
import os
import sys


def write_model(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        torch_dtype="float32", tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)  # peaked logits: greedy choices far from ties
    model.save_pretrained(path)


# 56 prompt tokens over a 32-token step budget: the 40-token prompt is chunked, so steps mix prefill and decode rows
PROMPTS = [[5, 17, 99], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 13], list(range(30, 70))]


def generate(path: str, backend: str, max_tokens: int) -> list[list[int]]:
    from vllm import LLM, SamplingParams
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # vLLM validates the backend name before it loads the plugins itself
    llm = LLM(
        model=path, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
        max_model_len=128, max_num_batched_tokens=32, max_num_seqs=4, block_size=32,
        attention_config={"backend": backend}, seed=0, distributed_executor_backend="uni",
        kv_cache_memory_bytes=1 << 20, gpu_memory_utilization=0.5,
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [list(o.outputs[0].token_ids) for o in outs]


def tilegraph_steps() -> int:
    """Steps tilegraph planned in this process (0: its backend never ran)."""
    if "tilegraph.integrations.vllm.objects" not in sys.modules:
        return 0
    held = sys.modules["tilegraph.integrations.vllm.objects"]._HELD.values()
    return max((h.step + 1 for h in held if h.step is not None), default=0)


if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: a registered backend name does not survive spawn
    if sys.argv[1] == "write":
        write_model(sys.argv[2])
    else:
        tokens = generate(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        print("RESULT " + json.dumps({"tokens": tokens, "tilegraph_steps": tilegraph_steps()}))
