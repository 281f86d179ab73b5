"""KV compaction: per KV head, move the kept audio slots to the front of the span and the suffix after them.

``reference.compact_kv`` is plain torch; ``triton.compact_kv`` the Triton kernel (import it explicitly, after
``TRITON_INTERPRET`` is decided).
"""
from .reference import compact_kv

__all__ = ["compact_kv"]
