"""vLLM end to end (marked slow too: its own CI stage runs it): greedy tokens of a tiny random-weight
Llama with the TILEGRAPH backend equal vLLM's own CPU attention, 4 prompts of different lengths,
a chunked prompt so steps mix prefill and decode rows. One engine per subprocess (e2e_generate.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm")

SCRIPT = Path(__file__).with_name("e2e_generate.py")


def _run(*args: str, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=540, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else {}


def test_greedy_tokens_match_vllm_cpu_attention(tmp_path):
    model = str(tmp_path / "tiny-llama")
    _run("write", model)
    reference = _run("gen", model, "CPU_ATTN", "8", env={"TILEGRAPH_VLLM_REPLACE_CPU_ATTN": "0"})
    ours = _run("gen", model, "TILEGRAPH", "8", env={"TILEGRAPH_VLLM_REPLACE_CPU_ATTN": "1"})
    assert reference["tilegraph_steps"] == 0  # vLLM's own attention really ran
    assert ours["tilegraph_steps"] >= 8  # tilegraph planned every step
    assert len({tuple(t) for t in reference["tokens"]}) == 4  # 4 different continuations
    assert ours["tokens"] == reference["tokens"]
