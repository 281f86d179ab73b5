"""HeadRouter's attention ops, installed as ``headrouter_vllm.kernels``: one folder per op, each with a
plain-torch ``reference.py`` (the semantics; the CPU path and the tests' oracle)."""
