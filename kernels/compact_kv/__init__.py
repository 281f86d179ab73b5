"""KV compaction: per KV head, move the kept audio slots into its cells of the compacted span and the suffix after it.

``reference.compact_kv`` is plain torch; ``triton.compact_kv`` the Triton kernel (import it explicitly, after
``TRITON_INTERPRET`` is decided).
"""
from .reference import compact_kv

__all__ = ["compact_kv"]
