"""Attention-side pieces. CPU: vLLM's stock CPU_ATTN runs unchanged; we read and move its KV pages here."""
