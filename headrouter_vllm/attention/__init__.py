"""Attention-side pieces.

* CPU (default): vLLM's stock CPU_ATTN runs unchanged; :mod:`.cpu_kv` reads and moves its KV pages.
* HeadRouter's own backend (:mod:`.backend`, vLLM's CUSTOM slot): vLLM's standard paged KV layout, our Triton
  kernels (cache write, head-sparse paged attention, probe, compaction). Native on GPU; on CPU it runs with the
  kernels interpreted (tests), selected by ``headrouter.attention = "triton"``.
"""
