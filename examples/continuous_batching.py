"""Continuous batching with tilegraph: a Llama-style decoder (random weights) serves requests that
join and finish at different steps; every step is one plan plus one CUDA-graph replay.

    python examples/continuous_batching.py          # a GPU: a ~1B model; no GPU: tiny, on the simulator

Prompts are fed one token per step through the decode step (the loop does not use BatchPrefill yet); sampling is greedy.
"""

import numpy as np

import tilegraph
from tilegraph.serving.llama import LlamaConfig, LlamaDecoder
from tilegraph.serving import DecodeRunner, Request, serve

if tilegraph.SIMULATOR:
    config = LlamaConfig.tiny()
    settings = config.attention_settings(page_size=4, max_batch_size=4, max_num_pages=32, graphs={"batch_sizes": [1, 2, 4]})
    prompt_lens, new_tokens = [6, 1, 3, 2], [3, 4, 2, 3]
else:
    config = LlamaConfig()  # Llama-3.2-1B's shape, bf16
    settings = config.attention_settings(page_size=16, max_batch_size=32, max_num_pages=2048)
    prompt_lens, new_tokens = [400, 3, 120, 30] * 6, [64, 32, 16, 100] * 6

rng = np.random.default_rng(0)
requests = [
    Request(request_id=i, prompt=tuple(rng.integers(0, config.vocab_size, n).tolist()), max_new_tokens=m, arrival_step=2 * i)
    for i, (n, m) in enumerate(zip(prompt_lens, new_tokens))
]

model = LlamaDecoder(config, device="cpu" if tilegraph.SIMULATOR else "cuda")
runner = DecodeRunner(model, settings, mode="graphs", show_progress=True)  # captures every bucket now
result = serve(runner, requests)

for r in requests[:4]:
    print(f"request {r.request_id}: prompt of {len(r.prompt)} tokens -> {result.tokens[r.request_id][:8]} ...")
stats = runner.graphs.stats
print(f"{result.num_steps} steps, batch sizes {min(result.batch_sizes)}-{max(result.batch_sizes)}, "
      f"{stats.replays} replays + {stats.eager_steps} eager steps, median step {np.median(result.step_s) * 1e3:.2f} ms"
      + (" (simulator: not a speed)" if tilegraph.SIMULATOR else ""))
