"""A small serving stack on top of the core: the continuous-batching loop (``loop``), a Llama-style
decoder whose attention runs through tilegraph (``llama``), the float64 reference (``reference``) and
the demo (``python -m tilegraph demo``).

``tilegraph.serving`` re-exports the loop's public names and the two runners.
"""

from .chunked import ChunkedRunner, default_token_buckets
from .loop import MODES, DecodeRunner, LoopResult, Request, StepBuffers, attention_error, serve

__all__ = ["MODES", "ChunkedRunner", "DecodeRunner", "LoopResult", "Request", "StepBuffers", "attention_error",
           "default_token_buckets", "serve"]
