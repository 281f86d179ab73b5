"""Every change HeadRouter makes to vLLM internals, one file per patched symbol.

Ledger (pinned: vLLM 0.32.0, V1 model runner; re-check every entry when the pin moves):

| file | patched symbol | why | how |
|---|---|---|---|
| platform_config.py | ``CpuPlatform.check_and_update_config`` (class) | with ``additional_config.headrouter`` set, validate it at startup, select our scheduler and worker, turn prefix caching off (routed requests rewrite their blocks) | wraps the classmethod; inert without the ``headrouter`` key; applied by ``register()`` |
| input_processor.py | ``InputProcessor._validate_params`` (class) | reject malformed per-request options in the front end (offline ``LLM`` and every server), before the engine sees them: a clear ``ValueError`` that vLLM's server turns into a 400 | wraps the method; inert unless the engine has HeadRouter configured; applied by ``register()`` |
| cpu_worker.py | ``vllm.v1.worker.cpu_worker.CPUModelRunner`` (module global) | ``CPUWorker.init_device`` builds its runner by that global name; there is no factory hook in 0.32 | rebinds it to our runner only for the duration of ``init_device`` |
| kv_cache_coordinator.py | ``KVCacheCoordinator.get_num_blocks_to_allocate`` / ``allocate_new_blocks`` (instance) | block accounting must see a shortened request's physical length (logical - removed) | wraps the two bound methods of our scheduler's coordinator |
| attention_forward.py | ``AttentionImpl.forward`` (instance, probe layer and, for ``in_prompt``, later layers) | the probe needs post-RoPE q/k of one layer after this step's KV write; a module hook dies under torch.compile, the impl call runs eagerly inside vLLM's custom op | instance attribute wrapping the bound method, installed on the first step |

Class-level patches are applied once (idempotent) and can be reverted (:func:`revert_all`) for tests.
"""

from __future__ import annotations

from collections.abc import Callable

_applied: dict[str, Callable[[], None]] = {}


def apply_once(name: str, apply: Callable[[], Callable[[], None]]) -> None:
    """Run ``apply`` (which returns its undo function) unless ``name`` is already applied."""
    if name not in _applied:
        _applied[name] = apply()


def revert_all() -> None:
    while _applied:
        _, undo = _applied.popitem()
        undo()


def applied() -> list[str]:
    return sorted(_applied)
