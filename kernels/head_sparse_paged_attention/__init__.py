"""Head-sparse paged attention: causal paged attention where each KV head reads its own kept part of an audio span.

``reference.head_sparse_paged_attention`` is plain torch (runs anywhere); ``triton.head_sparse_paged_attention``
is the Triton kernel (GPU, or CPU under ``TRITON_INTERPRET=1``). Import the Triton module explicitly: importing it
decorates the kernels, which must happen after ``TRITON_INTERPRET`` is decided.
"""
from .reference import head_sparse_paged_attention

__all__ = ["head_sparse_paged_attention"]
