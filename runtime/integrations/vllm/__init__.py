"""vLLM v1 attention backend on tilegraph (needs the ``vllm`` extra, its own environment).

``pip install "tilegraph[vllm]"`` registers the ``vllm.general_plugins`` entry point
(the top-level module ``tilegraph_vllm_plugin``): it adds the backend ``TILEGRAPH`` to vLLM's registry, selected with
``vllm.LLM(..., attention_config={"backend": "TILEGRAPH"})``. Modules: ``version`` (the supported vLLM range),
``backend`` / ``builder`` / ``metadata`` / ``impl`` (vLLM's four classes), ``page_table`` (a step's
host lengths; the kernels read vLLM's device block table in place), ``objects`` (the attention objects shared by layers).
"""
