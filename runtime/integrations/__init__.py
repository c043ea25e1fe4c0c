"""Adapters that let other libraries run their attention on tilegraph.

``tilegraph.integrations.transformers``: a Hugging Face transformers attention backend and a paged
KV cache (needs the ``transformers`` extra: ``pip install "tilegraph[transformers]"``).

Nothing is imported here: each adapter imports its library only when it is imported itself.
"""
