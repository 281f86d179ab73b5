"""Cache write: store this step's keys and values at their slots of the paged KV cache.

``reference.write_kv_cache`` is plain torch; ``triton.write_kv_cache`` the Triton kernel (import it explicitly,
after ``TRITON_INTERPRET`` is decided).
"""
from .reference import write_kv_cache

__all__ = ["write_kv_cache"]
