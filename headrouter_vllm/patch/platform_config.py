"""Patch: configure the engine for HeadRouter when ``additional_config.headrouter`` is present.

Patched on the running platform's class (``CpuPlatform``, or the CUDA platform on a GPU machine).
vLLM 0.32 calls ``current_platform.check_and_update_config(vllm_config)`` at the end of
``VllmConfig.__post_init__``, in the process that builds the engine config (API server or ``LLM``). After
the platform's own pass (which resolves ``worker_cls="auto"``) we validate the HeadRouter section (a bad
key or value stops startup with a clear message), select our scheduler and worker unless the user chose
them. Prefix caching stays as the user set it (vLLM's default: on): the scheduler keeps a routed request's
rewritten blocks out of the cache. Without the ``headrouter`` key nothing changes, except that a bad
``headrouter_encoder_window`` (a vanilla engine's switch, see ``qwen2_audio_encoder.py``) stops startup too.
"""

from __future__ import annotations

from headrouter_vllm.config import ConfigError, HeadRouterConfig, encoder_window
from headrouter_vllm.log import get_logger
from headrouter_vllm.routing.context import routing_context

logger = get_logger(__name__)

SCHEDULER_CLS = "headrouter_vllm.scheduler.HeadRouterScheduler"
CPU_WORKER_CLS = "headrouter_vllm.worker.HeadRouterCPUWorker"
VLLM_CPU_WORKER_CLS = "vllm.v1.worker.cpu_worker.CPUWorker"
GPU_WORKER_CLS = "headrouter_vllm.worker.HeadRouterGPUWorker"
VLLM_GPU_WORKER_CLS = "vllm.v1.worker.gpu_worker.Worker"


def _on_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def configure_engine(vllm_config) -> HeadRouterConfig | None:
    encoder_window(vllm_config)  # checked here, in the front end, for vanilla engines too
    config = HeadRouterConfig.from_vllm_config(vllm_config)
    if config is None:
        return None
    from headrouter_vllm.models import adapter_for, resolve_probe_layer

    hf_config = vllm_config.model_config.hf_config
    from headrouter_vllm.api import limits

    limits.set_max_audio_seconds(adapter_for(hf_config).max_audio_seconds)
    try:
        resolve_probe_layer(config, hf_config, routing_context(config).profiles)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls in (None, "", SCHEDULER_CLS):
        sched.scheduler_cls = SCHEDULER_CLS
    elif not (isinstance(sched.scheduler_cls, type) and sched.scheduler_cls.__name__ == "HeadRouterScheduler"):
        raise ConfigError(f"HeadRouter needs --scheduler-cls {SCHEDULER_CLS} (got {sched.scheduler_cls})")
    parallel = vllm_config.parallel_config
    if getattr(parallel, "pipeline_parallel_size", 1) > 1:
        raise ConfigError("HeadRouter does not support pipeline_parallel_size > 1 yet: the probe layer and the layers "
                          "it compacts would sit on different ranks")
    tp = getattr(parallel, "tensor_parallel_size", 1)
    total_kv_heads = vllm_config.model_config.get_total_num_kv_heads()
    if tp > 1 and total_kv_heads % tp:
        # vLLM would replicate KV heads across ranks; the runner's head gather assumes each rank owns a share
        raise ConfigError(f"HeadRouter with tensor_parallel_size {tp} needs the model's {total_kv_heads} KV heads "
                          "to split evenly across the ranks")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ConfigError("HeadRouter does not support speculative decoding yet (drafts write KV at unshifted slots)")
    on_cuda = _on_cuda()
    ours, vllms = (GPU_WORKER_CLS, VLLM_GPU_WORKER_CLS) if on_cuda else (CPU_WORKER_CLS, VLLM_CPU_WORKER_CLS)
    if parallel.worker_cls in ("auto", vllms):
        parallel.worker_cls = ours
    elif parallel.worker_cls != ours:
        raise ConfigError(f"HeadRouter needs --worker-cls {ours} (got {parallel.worker_cls})")
    if getattr(vllm_config, "use_v2_model_runner", False) is True:
        raise ConfigError("HeadRouter supports vLLM's V1 model runner only: set VLLM_USE_V2_MODEL_RUNNER=0")
    if getattr(parallel, "enable_dbo", False):
        raise ConfigError("HeadRouter does not support dual-batch overlap (--enable-dbo) yet")
    attention = config.resolved_attention(on_cuda)
    if config.semantics == "prefill":
        # the rows of the upper layers change mid-forward, so their attention metadata is rebuilt by the backend's own
        # builder (patch/prefill_hooks.py): tested for CPU_ATTN and for TRITON_ATTN (interpreted, on CPU)
        backend = vllm_config.attention_config.backend
        if attention != "platform":
            raise ConfigError("headrouter.semantics 'prefill' runs on vLLM's own attention only "
                              "(headrouter.attention 'platform')")
        if on_cuda and (backend is None or backend.name != "TRITON_ATTN"):
            raise ConfigError("headrouter.semantics 'prefill' on a GPU needs --attention-backend TRITON_ATTN: its "
                              "metadata rebuild is the one tested (FLASH_ATTN's and FLASHINFER's are not yet)")
        if not vllm_config.model_config.enforce_eager:
            raise ConfigError("headrouter.semantics 'prefill' changes the batch between decoder layers, which a "
                              "compiled model cannot: add --enforce-eager")
        if tp > 1:
            raise ConfigError("headrouter.semantics 'prefill' is not yet supported with tensor parallelism")
    check_kv_cache(vllm_config, attention, on_cuda)
    if attention == "platform":
        if config.mode == "per_head":
            raise ConfigError("headrouter.mode 'per_head' needs attention 'triton' or 'torch' (HeadRouter's "
                              "backend; vLLM's own attention cannot skip each head's pruned slots)")
        if on_cuda:
            check_stock_gpu_backend(vllm_config)
    else:
        select_headrouter_attention(vllm_config, attention)
    if on_cuda and getattr(sched, "async_scheduling", False):
        # our scheduler frees a routed request's tail blocks after its prompt step's output: synchronous
        sched.async_scheduling = False
        logger.warning("HeadRouter turns vLLM's async scheduling off")
    from headrouter_vllm.metrics import metrics

    metrics()  # registered now, so /metrics shows them at 0 from startup
    if config.mode == "per_head" and tp > 1:
        logger.warning("HeadRouter per_head with tensor_parallel_size %d: each rank packs its own KV heads into the "
                       "mean budget, so the per-head budgets are balanced within each rank's %d KV heads (the kept "
                       "tokens differ from a single-rank engine's)", tp, total_kv_heads // tp)
    logger.info("HeadRouter configured: %s", config)
    return config


def check_kv_cache(vllm_config, attention: str, on_cuda: bool) -> None:
    """What HeadRouter's probe and compaction can read and move, refused at startup rather than at the first
    compaction: a quantized KV cache, and (vLLM's standard paged layout) block sizes its kernels do not take."""
    from vllm.utils.torch_utils import is_quantized_kv_cache

    cache = vllm_config.cache_config
    if is_quantized_kv_cache(getattr(cache, "cache_dtype", "auto")):
        raise ConfigError(f"HeadRouter reads and moves KV in the model's dtype: --kv-cache-dtype {cache.cache_dtype} "
                          "is not supported (use auto)")
    if attention == "platform" and not on_cuda:
        return  # CPU_ATTN: pages addressed in torch, any block size vLLM's CPU attention takes
    block_size = getattr(cache, "block_size", None)
    largest = 128 if attention != "platform" else None  # HeadRouter's backend declares 16-128
    if block_size is not None and not (block_size >= 16 and block_size & (block_size - 1) == 0
                                       and (largest is None or block_size <= largest)):
        raise ConfigError("HeadRouter's probe and compaction kernels need a block size that is a power of two >= 16"
                          + (f" and <= {largest} on HeadRouter's attention backend" if largest else "")
                          + f", got --block-size {block_size}")


def check_stock_gpu_backend(vllm_config) -> None:
    """Shared mode on a GPU keeps vLLM's own backend: one whose cache is vLLM's standard paged layout, or none
    chosen yet (vLLM picks; the runner checks what it picked when the KV caches are allocated)."""
    from headrouter_vllm.attention.kv_store import STOCK_GPU_BACKENDS

    backend = vllm_config.attention_config.backend
    if backend is not None and backend.name not in STOCK_GPU_BACKENDS:
        raise ConfigError(f"HeadRouter reads and moves the KV cache of {', '.join(STOCK_GPU_BACKENDS)} only; "
                          f"--attention-backend {backend.name} is not supported")


def select_headrouter_attention(vllm_config, kernels: str) -> None:
    """Serve the decoder layers with HeadRouter's backend (vLLM's CUSTOM slot; see attention_backend.py)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from headrouter_vllm.patch.attention_backend import register_custom_backend

    if not register_custom_backend():
        raise ConfigError(f"headrouter.attention {kernels!r} needs vLLM's CUSTOM attention backend slot, which "
                          "another plugin has registered")
    attention = vllm_config.attention_config
    if attention.backend not in (None, AttentionBackendEnum.CUSTOM):
        raise ConfigError(f"headrouter.attention {kernels!r} conflicts with --attention-backend "
                          f"{attention.backend.name}")
    attention.backend = AttentionBackendEnum.CUSTOM
    from vllm.config import CUDAGraphMode

    # its kernels' grids depend on each step's lengths (AttentionCGSupport.NEVER): vLLM turns its default
    # FULL_AND_PIECEWISE into PIECEWISE, but a full-only mode asked for by hand would fail at startup (FULL) or
    # silently capture nothing (FULL_DECODE_ONLY)
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode in (CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY):
        raise ConfigError(f"HeadRouter's attention backend (headrouter.attention {kernels!r}) has no full CUDA "
                          f"graphs: -cc.cudagraph_mode {mode.name} cannot apply (leave it unset, or use PIECEWISE; "
                          "shared-mode engines keep vLLM's own backend and its full graphs)")
    if kernels == "torch":
        logger.info("HeadRouter attention backend selected, with the kernels' torch references")
    elif not _on_cuda():
        logger.warning("HeadRouter attention backend selected on CPU: its Triton kernels run under the Triton "
                       "interpreter (slow; meant for tests)")


def apply():
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    own = platform_cls.__dict__.get("check_and_update_config")  # None: inherited from a base class
    platform_pass = platform_cls.check_and_update_config  # bound to platform_cls

    def check_and_update_config(cls, vllm_config) -> None:
        platform_pass(vllm_config)
        configure_engine(vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)

    def undo() -> None:
        if own is None:
            delattr(platform_cls, "check_and_update_config")
        else:
            platform_cls.check_and_update_config = own

    return undo
