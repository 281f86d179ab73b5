"""Shared fixtures: scratch folders for vLLM, a locally built tiny model, espeak-ng speech, and engines
shared per test module or session (an in-process engine starts in about 3 s once warm, a server in about a minute on
two cores)."""

from __future__ import annotations

import os
import tempfile

# vLLM reads these at import: set them before anything imports vllm.
# Scratch lives inside the checkout (git-ignored): nothing is written outside it.
_SCRATCH = os.environ.get("HEADROUTER_TEST_SCRATCH") or os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".scratch", "tests")
for _name, _value in {
    "VLLM_CACHE_ROOT": os.path.join(_SCRATCH, "vllm-cache"),
    "VLLM_RPC_BASE_PATH": os.path.join(_SCRATCH, "rpc"),
    "TMPDIR": os.path.join(_SCRATCH, "tmp"),
    "TORCHINDUCTOR_CACHE_DIR": os.path.join(_SCRATCH, "torchinductor"),  # vLLM would pick /tmp
    "TRITON_CACHE_DIR": os.path.join(_SCRATCH, "triton"),
    "MPLCONFIGDIR": os.path.join(_SCRATCH, "matplotlib"),
}.items():
    os.environ.setdefault(_name, _value)
    os.makedirs(os.environ[_name], exist_ok=True)
tempfile.tempdir = None  # re-read TMPDIR
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in process: tests read the scheduler's block pool
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The environment as it is before any in-process engine runs: vLLM writes per-engine variables into os.environ
# (e.g. the name of its multimodal shared-memory buffer), which a server started later must not inherit.
CLEAN_ENV = dict(os.environ)

import pytest  # noqa: E402

TINY_MODELS = {"qwen2-audio": "tiny-qwen2-audio", "qwen2.5-omni": "tiny-qwen2.5-omni"}  # per model family


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``get(family)``: the family's tiny model, built locally once per session."""
    from headrouter_vllm.models.build import make_model

    built = {}

    def get(family: str) -> str:
        if family not in built:
            name = TINY_MODELS[family]
            built[family] = str(make_model(name, tmp_path_factory.mktemp("models") / name))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> str:
    return tiny_models("qwen2-audio")


@pytest.fixture(scope="session")
def speech() -> dict:
    from headrouter_vllm.audio import speak

    return {
        "short": speak("hello world, this is a test of the tiny audio model"),
        "long": speak("the quick brown fox jumps over the lazy dog, and then it runs far away into the forest "
                      "where nobody can see it"),
    }


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory):
    """A HeadRouter server (retention 1.0 by default) on the tiny model, shared by the session (a start costs about
    a minute on two cores), stopped by pid. Tests read its counters and log lines as differences. The restart test
    stops it and starts it again on the same port (``proc`` is then the new server)."""
    import openai

    from tests.test_http import free_port, start_server, stop_server

    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    state = dict(base=f"http://127.0.0.1:{port}", port=port, log=log_path, model=tiny_model,
                 proc=start_server(tiny_model, log_path, port))
    state["client"] = openai.OpenAI(base_url=state["base"] + "/v1", api_key="none")
    try:
        yield state
    finally:
        stop_server(state["proc"])


# HEADROUTER_FULL_MATRIX=1: run every combination, the ones deselected for CI time included (hours on 2 cores);
# =rest: only those (the complement of what CI runs)
FULL_MATRIX = os.environ.get("HEADROUTER_FULL_MATRIX", "")


def pytest_collection_modifyitems(config, items):
    """A test module may narrow its cross product of parameters with ``collect_only_if(item) -> bool``: the items it
    declines are deselected (reported as such), not skipped, unless ``HEADROUTER_FULL_MATRIX=1`` (``rest``: only
    those)."""
    if FULL_MATRIX not in ("", "1", "rest"):
        raise pytest.UsageError(f"HEADROUTER_FULL_MATRIX must be 1 or rest, got {FULL_MATRIX!r}")
    if FULL_MATRIX == "1":
        return
    keep, deselected = [], []
    for item in items:
        rule = getattr(item.module, "collect_only_if", None)
        (keep if rule is None or rule(item) else deselected).append(item)
    if FULL_MATRIX == "rest":
        keep, deselected = deselected, keep
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep
