"""The HTTP edge: per-request options, their validation, and the metadata → vllm_xargs middleware."""
