"""Patch: make the scheduler's block accounting see shortened requests at their physical length.

vLLM 0.32 ``KVCacheCoordinator.get_num_blocks_to_allocate`` and ``allocate_new_blocks`` are the only
places that turn token counts into block counts (``KVCacheManager.allocate_slots`` and
``Scheduler._request_remaining_blocks`` both go through them). For a request whose KV is ``removed``
slots shorter than its logical length we subtract that from every token count they receive.
``max_model_len`` checks stay on logical tokens (positions are logical).
"""

from __future__ import annotations

from collections.abc import Mapping


def wrap_block_accounting(coordinator, removed: Mapping[str, int]) -> None:
    get_orig = coordinator.get_num_blocks_to_allocate
    alloc_orig = coordinator.allocate_new_blocks

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

    coordinator.get_num_blocks_to_allocate = get_num_blocks_to_allocate
    coordinator.allocate_new_blocks = allocate_new_blocks
