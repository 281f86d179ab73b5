"""Patch: make the scheduler's block accounting see shortened requests at their physical length, and keep a routed
request's rewritten blocks out of the prefix cache.

vLLM 0.32 ``KVCacheCoordinator.get_num_blocks_to_allocate`` and ``allocate_new_blocks`` are the only
places that turn token counts into block counts (``KVCacheManager.allocate_slots`` and
``Scheduler._request_remaining_blocks`` both go through them). For a request whose KV is ``removed``
slots shorter than its logical length we subtract that from every token count they receive.
``max_model_len`` checks stay on logical tokens (positions are logical).

``KVCacheCoordinator.cache_blocks`` is where every full block is hashed into the prefix cache (from
``KVCacheManager.allocate_slots`` and ``cache_blocks``). A routed request's blocks from its first audio token on are
rewritten by compaction (and its logical token count no longer maps onto its physical blocks), so for those
requests we cap the count at ``cacheable_tokens(request_id)``: only the whole blocks before the first audio token
(a system prompt, earlier turns' text) are ever cached; the same bytes vanilla would compute there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


def wrap_block_accounting(coordinator, removed: Mapping[str, int],
                          cacheable_tokens: Callable[[str], int | None]) -> None:
    get_orig = coordinator.get_num_blocks_to_allocate
    alloc_orig = coordinator.allocate_new_blocks
    cache_orig = coordinator.cache_blocks

    def get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks, num_encoder_tokens,
                                   total_computed_tokens, num_local_computed_tokens, num_tokens_main_model,
                                   *args, **kwargs):
        d = removed.get(request_id, 0)
        if d:
            num_tokens -= d
            total_computed_tokens = max(0, total_computed_tokens - d)
            num_local_computed_tokens = max(0, num_local_computed_tokens - d)
            num_tokens_main_model -= d
        return get_orig(request_id, num_tokens, new_computed_blocks, num_encoder_tokens, total_computed_tokens,
                        num_local_computed_tokens, num_tokens_main_model, *args, **kwargs)

    def allocate_new_blocks(request_id, num_tokens, num_tokens_main_model, *args, **kwargs):
        d = removed.get(request_id, 0)
        return alloc_orig(request_id, num_tokens - d, num_tokens_main_model - d, *args, **kwargs)

    def cache_blocks(request, num_computed_tokens, *args, **kwargs):
        cap = cacheable_tokens(request.request_id)
        if cap is not None:
            num_computed_tokens = min(num_computed_tokens, cap)
        return cache_orig(request, num_computed_tokens, *args, **kwargs)

    coordinator.get_num_blocks_to_allocate = get_num_blocks_to_allocate
    coordinator.allocate_new_blocks = allocate_new_blocks
    coordinator.cache_blocks = cache_blocks
