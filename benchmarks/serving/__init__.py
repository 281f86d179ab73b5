"""``headrouter-vllm bench``: vanilla vLLM vs HeadRouter on the same requests, in one run."""
