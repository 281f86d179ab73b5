"""The patch ledger is true: every vLLM method HeadRouter's subclasses override is listed in ``patch/LEDGER.md``,
exists in the pinned vLLM, and still has the parameters HeadRouter was written against (a vLLM upgrade that renames
or reorders one fails here, not while serving)."""

from __future__ import annotations

import inspect
import re
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


def load(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(__import__(module, fromlist=[name]), name)


def ledger_rows() -> dict[str, set[str]]:
    """Our class name -> the vLLM methods the ledger's override table lists for it."""
    table = LEDGER.read_text().split("## Subclass overrides", 1)[1]
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
