"""HeadRouterConfig, the platform hook that configures an engine, and the CLI's serve command."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import types

import pytest

from headrouter_vllm.config import ConfigError, HeadRouterConfig


def test_defaults():
    config = HeadRouterConfig.from_dict({})
    assert (config.retention, config.mode, config.semantics, config.default_task) == (0.7, "shared", "after_prompt",
                                                                                      "auto")


@pytest.mark.parametrize("values,message", [
    ({"retension": 0.5}, "did you mean 'retention'"),
    ({"colour": 1}, "unknown headrouter setting 'colour'"),
    ({"retention": 0}, "retention must be in (0, 1]"),
    ({"retention": 1.5}, "retention must be in (0, 1]"),
    ({"retention": "0.5"}, "retention must be a number"),
    ({"retention": "Auto"}, "retention must be a number in (0, 1] or auto"),
    ({"retention": "auto"}, "retention 'auto' takes each task's retention from the profile file's retention table, "
                            "and no profile file is set"),
    ({"retention": True}, "retention must be a number"),
    ({"retention": float("nan")}, "retention must be a number"),
    ({"mode": "both"}, "mode must be one of"),
    ({"mode": "per_head", "attention": "platform"}, "needs attention 'triton'"),
    ({"mode": "per_head", "semantics": "in_prompt"}, "after_prompt' only"),
    ({"per_head_cap": 0.5}, "per_head_cap must be a number >= 1"),
    ({"semantics": "fastv"}, "semantics must be one of"),
    ({"probe_point": "last"}, "probe_point must be one of"),
    ({"probe_point": "first_token", "semantics": "in_prompt"}, "does not apply"),
    ({"probe_point": "first_token", "semantics": "prefill"}, "does not apply"),
    ({"mode": "per_head", "semantics": "prefill", "attention": "torch"}, "after_prompt' only"),
    ({"probe_point": "first_token", "mode": "per_head", "attention": "torch"}, "probe_point 'prompt' only"),
    ({"probe_layer": -1}, "probe_layer must be a non-negative integer"),
    ({"probe_layer": 1.5}, "probe_layer must be a non-negative integer"),
    ({"default_task": "karaoke"}, "unknown task 'karaoke'"),
    ({"profiles": "p.json"}, "profile file p.json does not exist"),
    ({"policy": "best"}, "policy must be one of"),
    ({"policy": "region"}, "per-request policy"),
    ({"seed": "1"}, "seed must be an integer"),
    ({"attention": "flash"}, "attention must be one of"),
    ({"admission_headroom": -1}, "admission_headroom must be a non-negative integer"),
    ({"admission_headroom": 1.5}, "admission_headroom must be a non-negative integer"),
    ({"admission_headroom": True}, "admission_headroom must be a non-negative integer"),
    ({"encoder_window": "yes"}, "encoder_window must be true or false"),
], ids=lambda v: str(v)[:40])
def test_bad_settings_are_clear_errors(values, message):
    """At startup: the config's values when it is built, the profile file when the process builds its routing
    context (the front end, the scheduler and each runner do, before any request)."""
    from headrouter_vllm.routing.context import routing_context

    with pytest.raises(ConfigError, match=None) as info:
        routing_context(HeadRouterConfig.from_dict(values))
    assert message in str(info.value)


def fake_vllm_config(additional_config, scheduler_cls=None, worker_cls="vllm.v1.worker.cpu_worker.CPUWorker",
                     prefix_caching=True, architectures=("Qwen2AudioForConditionalGeneration",), tp=1, spec=None,
                     block_size=32, dbo=False, pp=1, enforce_eager=True, cache_dtype="auto", backend=None,
                     cudagraph_mode=None):
    return types.SimpleNamespace(
        additional_config=additional_config,
        model_config=types.SimpleNamespace(hf_config=types.SimpleNamespace(
            architectures=list(architectures), get_text_config=lambda: types.SimpleNamespace(num_hidden_layers=4)),
            get_total_num_kv_heads=lambda: 2, enforce_eager=enforce_eager),
        scheduler_config=types.SimpleNamespace(scheduler_cls=scheduler_cls),
        parallel_config=types.SimpleNamespace(worker_cls=worker_cls, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                              enable_dbo=dbo),
        speculative_config=spec,
        cache_config=types.SimpleNamespace(enable_prefix_caching=prefix_caching, block_size=block_size,
                                           cache_dtype=cache_dtype),
        attention_config=types.SimpleNamespace(backend=backend),
        compilation_config=types.SimpleNamespace(cudagraph_mode=cudagraph_mode))


def test_engine_without_headrouter_is_untouched():
    from headrouter_vllm.patch.platform_config import configure_engine

    config = fake_vllm_config({})
    assert configure_engine(config) is None
    assert config.scheduler_config.scheduler_cls is None
    assert config.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"
    assert config.cache_config.enable_prefix_caching is True


def test_headrouter_section_selects_scheduler_worker_and_keeps_prefix_caching():
    from headrouter_vllm.patch.platform_config import CPU_WORKER_CLS, SCHEDULER_CLS, configure_engine

    config = fake_vllm_config({"headrouter": {"retention": 0.5}})
    assert configure_engine(config).retention == 0.5
    assert config.scheduler_config.scheduler_cls == SCHEDULER_CLS
    assert config.parallel_config.worker_cls == CPU_WORKER_CLS
    assert config.cache_config.enable_prefix_caching is True  # as the user set it: the scheduler keeps it safe


@pytest.mark.parametrize("kwargs,message", [
    (dict(additional_config={"headrouter": {"retension": 0.5}}), "did you mean"),
    (dict(additional_config={"headrouter": 0.5}), "must be an object"),
    (dict(additional_config={"headrouter": {}}, scheduler_cls="my.Scheduler"), "--scheduler-cls"),
    (dict(additional_config={"headrouter": {}}, worker_cls="my.Worker"), "--worker-cls"),
    (dict(additional_config={"headrouter": {}}, architectures=("LlamaForCausalLM",)), "does not support"),
    (dict(additional_config={"headrouter": {"probe_layer": 4}}), "probe_layer 4 >= the model's 4 layers"),
    (dict(additional_config={"headrouter": {}}, tp=4), "2 KV heads to split evenly"),
    (dict(additional_config={"headrouter": {}}, pp=2), "pipeline_parallel_size > 1"),
    (dict(additional_config={"headrouter": {}}, spec=object()), "speculative decoding"),
    (dict(additional_config={"headrouter": {"attention": "torch"}}, block_size=24), "power of two >= 16"),
    # HeadRouter's backend declares 16-128: vLLM would split 256-token blocks, and the first compaction fail
    (dict(additional_config={"headrouter": {"attention": "torch"}}, block_size=256), "<= 128"),
    (dict(additional_config={"headrouter": {}}, cache_dtype="fp8"), "--kv-cache-dtype fp8 is not supported"),
    (dict(additional_config={"headrouter": {"attention": "torch"}}, cache_dtype="fp8_e5m2"), "not supported"),
    (dict(additional_config={"headrouter": {"mode": "per_head", "attention": "platform"}}), "per_head"),
    (dict(additional_config={"headrouter": {}}, dbo=True), "dual-batch overlap"),
    (dict(additional_config={"headrouter": {"semantics": "prefill"}}, enforce_eager=False), "add --enforce-eager"),
    (dict(additional_config={"headrouter": {"semantics": "prefill", "attention": "torch"}}),
     "vLLM's own attention only"),
    (dict(additional_config={"headrouter": {"semantics": "prefill"}}, tp=2), "tensor parallelism"),
])
def test_misconfigured_engine_stops_with_a_clear_error(kwargs, message):
    from headrouter_vllm.patch.platform_config import configure_engine

    with pytest.raises(ValueError) as info:
        configure_engine(fake_vllm_config(**kwargs))
    assert message in str(info.value)


def test_tensor_parallel_engine_is_configured():
    from headrouter_vllm.patch.platform_config import SCHEDULER_CLS, configure_engine

    config = fake_vllm_config({"headrouter": {}}, tp=2)
    assert configure_engine(config) is not None
    assert config.scheduler_config.scheduler_cls == SCHEDULER_CLS


def test_attention_switch_and_environment(monkeypatch):
    monkeypatch.delenv("HEADROUTER_ATTENTION", raising=False)
    assert HeadRouterConfig().resolved_attention() == "platform"
    assert HeadRouterConfig().resolved_attention(on_cuda=True) == "platform"  # shared mode: vLLM's own backend
    # per_head needs HeadRouter's backend: Triton on a GPU, the torch references on CPU
    assert HeadRouterConfig(mode="per_head").resolved_attention(on_cuda=True) == "triton"
    assert HeadRouterConfig(mode="per_head").resolved_attention() == "torch"
    monkeypatch.setenv("HEADROUTER_ATTENTION", "triton")
    assert HeadRouterConfig().resolved_attention() == "triton"
    assert HeadRouterConfig(attention="platform").resolved_attention() == "platform"  # the config wins
    monkeypatch.setenv("HEADROUTER_ATTENTION", "fast")
    with pytest.raises(ConfigError, match="HEADROUTER_ATTENTION must be one of"):
        HeadRouterConfig().resolved_attention()


def test_attention_triton_selects_our_backend_in_the_custom_slot(monkeypatch):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from headrouter_vllm.attention.backend import BACKEND_PATH
    from headrouter_vllm.patch.platform_config import configure_engine
    from headrouter_vllm.plugin import register

    register()
    monkeypatch.delenv("HEADROUTER_ATTENTION", raising=False)
    config = fake_vllm_config({"headrouter": {"attention": "triton"}})
    configure_engine(config)
    assert config.attention_config.backend == AttentionBackendEnum.CUSTOM
    assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CUSTOM, None) == BACKEND_PATH
    # other selections still get vLLM's CPU backend
    selector = types.SimpleNamespace(use_sparse=False, use_mla=False)
    assert CpuPlatform.get_attn_backend_cls(None, selector) == AttentionBackendEnum.CPU_ATTN.get_path()
    config.attention_config = types.SimpleNamespace(backend=AttentionBackendEnum.CPU_ATTN)
    with pytest.raises(ConfigError, match="conflicts with --attention-backend CPU_ATTN"):
        configure_engine(config)


def test_gpu_engine_keeps_vllms_backend_in_shared_mode(monkeypatch):
    """The configuration a CUDA machine gets (the platform check is faked: no GPU here): the GPU worker, synchronous
    scheduling, and in shared mode the backend vLLM picks (or a stock one named), with its CUDA graph mode."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from headrouter_vllm.patch import platform_config
    from headrouter_vllm.runner import HeadRouterGPUModelRunner, HeadRouterRunnerMixin
    from headrouter_vllm.worker import HeadRouterGPUWorker

    monkeypatch.setattr(platform_config, "_on_cuda", lambda: True)
    monkeypatch.delenv("HEADROUTER_ATTENTION", raising=False)

    def gpu_config(section=None, **kwargs):
        return fake_vllm_config({"headrouter": section or {}}, worker_cls=platform_config.VLLM_GPU_WORKER_CLS,
                                **kwargs)

    config = gpu_config(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    config.scheduler_config.async_scheduling = True
    platform_config.configure_engine(config)
    assert config.parallel_config.worker_cls == platform_config.GPU_WORKER_CLS
    assert config.attention_config.backend is None  # vLLM picks (FLASH_ATTN on Hopper); the runner checks it
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
    assert config.scheduler_config.async_scheduling is False
    for name in ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN"):
        named = gpu_config(backend=AttentionBackendEnum[name], cudagraph_mode=CUDAGraphMode.FULL)
        platform_config.configure_engine(named)
        assert named.attention_config.backend == AttentionBackendEnum[name]
    with pytest.raises(ConfigError, match="FLEX_ATTENTION is not supported"):
        platform_config.configure_engine(gpu_config(backend=AttentionBackendEnum.FLEX_ATTENTION))
    # block sizes above HeadRouter's backend's 128 are vLLM's business on its own backends (the runner refuses a
    # split into smaller kernel blocks at startup)
    platform_config.configure_engine(gpu_config(block_size=256))
    with pytest.raises(ConfigError, match="power of two"):
        platform_config.configure_engine(gpu_config(block_size=48))
    assert issubclass(HeadRouterGPUModelRunner, HeadRouterRunnerMixin)
    assert "_make_model_runner" in HeadRouterGPUWorker.__dict__


def test_gpu_prefill_engine_needs_triton_attn_and_eager(monkeypatch):
    """prefill on a GPU: vLLM's TRITON_ATTN (whose metadata rebuild the engine tests check, interpreted on CPU) with
    --enforce-eager; FLASH_ATTN, FLASHINFER and vLLM's own pick are refused with the reason."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from headrouter_vllm.patch import platform_config

    monkeypatch.setattr(platform_config, "_on_cuda", lambda: True)
    monkeypatch.delenv("HEADROUTER_ATTENTION", raising=False)

    def gpu_prefill(backend=None, **kwargs):
        return fake_vllm_config({"headrouter": {"semantics": "prefill"}},
                                worker_cls=platform_config.VLLM_GPU_WORKER_CLS,
                                backend=None if backend is None else AttentionBackendEnum[backend], **kwargs)

    assert platform_config.configure_engine(gpu_prefill("TRITON_ATTN")).semantics == "prefill"
    for backend in (None, "FLASH_ATTN", "FLASHINFER"):
        with pytest.raises(ConfigError, match="needs --attention-backend TRITON_ATTN"):
            platform_config.configure_engine(gpu_prefill(backend))
    with pytest.raises(ConfigError, match="add --enforce-eager"):
        platform_config.configure_engine(gpu_prefill("TRITON_ATTN", enforce_eager=False))


@pytest.mark.parametrize("mode", ["FULL", "FULL_DECODE_ONLY"])
def test_gpu_per_head_engine_gets_our_backend_without_full_graphs(monkeypatch, mode):
    from vllm.config import CUDAGraphMode
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from headrouter_vllm.patch import platform_config

    monkeypatch.setattr(platform_config, "_on_cuda", lambda: True)
    monkeypatch.delenv("HEADROUTER_ATTENTION", raising=False)
    config = fake_vllm_config({"headrouter": {"mode": "per_head"}}, worker_cls=platform_config.VLLM_GPU_WORKER_CLS,
                              cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    platform_config.configure_engine(config)  # vLLM then turns the default into PIECEWISE
    assert config.attention_config.backend == AttentionBackendEnum.CUSTOM
    with pytest.raises(ConfigError, match=f"cudagraph_mode {mode} cannot apply"):
        platform_config.configure_engine(fake_vllm_config(
            {"headrouter": {"mode": "per_head"}}, worker_cls=platform_config.VLLM_GPU_WORKER_CLS,
            cudagraph_mode=CUDAGraphMode[mode]))
    with pytest.raises(ConfigError, match="<= 128"):
        platform_config.configure_engine(fake_vllm_config(
            {"headrouter": {"mode": "per_head"}}, worker_cls=platform_config.VLLM_GPU_WORKER_CLS, block_size=256))


PATCHES = ["attention_backend", "omni_audio_budget", "output_processor", "platform_config", "qwen2_audio_encoder",
           "sampling_params"]


def test_register_is_idempotent_and_reversible():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.sampling_params import SamplingParams

    from headrouter_vllm import patch
    from headrouter_vllm.plugin import register

    # An in-process HeadRouterMiddleware (an earlier test) has applied the API server's patches too; start from none
    # so this checks what register() alone applies.
    patch.revert_all()
    register()
    patched = (CpuPlatform.__dict__["check_and_update_config"], SamplingParams._verify_extra_args)
    register()
    assert (CpuPlatform.__dict__["check_and_update_config"], SamplingParams._verify_extra_args) == patched
    assert patch.applied() == PATCHES
    patch.revert_all()
    try:
        assert SamplingParams._verify_extra_args is not patched[1]
        assert CpuPlatform.__dict__["check_and_update_config"] is not patched[0]
    finally:
        register()
    assert patch.applied() == PATCHES


def test_plugin_entry_point_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "headrouter"]
    assert ep.value == "headrouter_vllm.plugin:register"


def test_serve_command(capsys):
    from headrouter_vllm.cli import main

    assert main(["serve", "/models/m", "--retention", "0.5", "--print-command", "--port", "8001"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    config = json.loads(cmd[cmd.index("--additional-config") + 1])
    assert config == {"headrouter": {"retention": 0.5}}  # only what the command line sets
    assert cmd[cmd.index("--middleware") + 1] == "headrouter_vllm.api.middleware.HeadRouterMiddleware"
    assert "--no-enable-prefix-caching" not in cmd and cmd[-2:] == ["--port", "8001"]  # vLLM's default: on


def test_serve_uses_the_profile_file_beside_the_model(tmp_path, capsys):
    """A model directory with ``headrouter_profiles.json`` (make-model writes the listening models' tuned one) is
    served with it unless ``--profiles`` names another or ``--ignore-model-profiles`` is given; it says so."""
    import torch

    from headrouter_vllm.cli import main
    from headrouter_vllm.names import GROUPS, MODEL_PROFILES_FILE
    from headrouter_vllm.routing.profiles import ModelIdentity, Profile, ProfileSet

    weights = torch.full((4,), 0.25)
    ProfileSet(ModelIdentity("X", 4, 4, 2, 32), 2, 0.1, {g: Profile(weights, weights) for g in GROUPS}, None,
               {}).save(tmp_path / MODEL_PROFILES_FILE)
    other = tmp_path / "other.json"
    other.write_bytes((tmp_path / MODEL_PROFILES_FILE).read_bytes())

    def section(*extra):
        assert main(["serve", str(tmp_path), "--print-command", *extra]) == 0
        out = capsys.readouterr()
        cmd = shlex.split(out.out)
        return json.loads(cmd[cmd.index("--additional-config") + 1])["headrouter"], out.err

    found, note = section()
    assert found == {"profiles": str(tmp_path / MODEL_PROFILES_FILE)} and "profile file beside the model" in note
    assert section("--profiles", str(other))[0] == {"profiles": str(other)}
    assert section("--ignore-model-profiles") == ({}, "")


def test_serve_retention_auto_needs_a_profile_file_with_a_retention_table(tmp_path, capsys):
    """``--retention auto`` reaches the config as the word; without a table it stops before the server starts."""
    import torch

    from headrouter_vllm.cli import main
    from headrouter_vllm.names import GROUPS
    from headrouter_vllm.routing.profiles import ModelIdentity, Profile, ProfileSet
    from headrouter_vllm.routing.retention import RetentionTable

    weights = torch.full((4,), 0.25)
    plain = ProfileSet(ModelIdentity("X", 4, 4, 2, 32), 2, 0.1, {g: Profile(weights, weights) for g in GROUPS}, None,
                       {})
    plain.save(tmp_path / "plain.json")
    dataclasses.replace(plain, retention=RetentionTable({"semantic": 0.3, "acoustic": 0.5, "mixed": 0.5})).save(
        tmp_path / "table.json")
    assert main(["serve", "/models/m", "--retention", "auto", "--profiles", str(tmp_path / "table.json"),
                 "--print-command"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert json.loads(cmd[cmd.index("--additional-config") + 1])["headrouter"]["retention"] == "auto"
    with pytest.raises(SystemExit):
        main(["serve", "/models/m", "--retention", "auto", "--profiles", str(tmp_path / "plain.json")])
    assert "plain.json has none (headrouter-vllm quality --tune-retention writes one)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # probe point routed needs the group router: refused before the server starts
        main(["serve", "/models/m", "--probe-point", "routed", "--profiles", str(tmp_path / "plain.json")])
    assert "plain.json has no router (headrouter-vllm calibrate writes one)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "/models/m", "--retention", "most"])
    assert "retention must be a number in (0, 1] or auto" in capsys.readouterr().err


def test_serve_passes_mode_and_attention(capsys):
    from headrouter_vllm.cli import main

    assert main(["serve", "/models/m", "--mode", "per_head", "--attention", "torch", "--per-head-cap", "2",
                 "--admission-headroom", "64", "--print-command"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    section = json.loads(cmd[cmd.index("--additional-config") + 1])["headrouter"]
    assert (section["mode"], section["attention"], section["per_head_cap"]) == ("per_head", "torch", 2.0)
    assert section["admission_headroom"] == 64


def test_serve_rejects_bad_settings_before_starting(capsys):
    from headrouter_vllm.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "/models/m", "--retention", "2"])
    assert info.value.code == 2
    assert "retention must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_entrypoint_builds_a_server_command(capsys, name):
    """No container engine here: check the command line the image runs."""
    from pathlib import Path

    from headrouter_vllm.cli import main

    dockerfile = (Path(__file__).parents[1] / name).read_text()
    entry = json.loads(next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT")).split(" ", 1)[1])
    assert entry[0] == "headrouter-vllm" and "headrouter-vllm = headrouter_vllm.cli:main" in (
        Path(__file__).parents[1] / "setup.py").read_text()
    assert main([*entry[1:], "/models/m", "--host", "0.0.0.0", "--retention", "0.7", "--print-command"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[cmd.index("--model") + 1] == "/models/m" and cmd[-2:] == ["--host", "0.0.0.0"]


@pytest.mark.parametrize("component", ["scheduler", "model runner"])
def test_headrouter_classes_without_a_headrouter_section_refuse_to_start(monkeypatch, component):
    """``--scheduler-cls`` / ``--worker-cls`` set by hand without ``additional_config.headrouter``: a startup error
    naming the fix, not pruning at a default retention nobody asked for."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from headrouter_vllm.runner import HeadRouterCPUModelRunner
    from headrouter_vllm.scheduler import HeadRouterScheduler

    base, cls = (Scheduler, HeadRouterScheduler) if component == "scheduler" else (CPUModelRunner,
                                                                                     HeadRouterCPUModelRunner)
    vllm_config = types.SimpleNamespace(additional_config={})

    def base_init(self, *args, **kwargs):  # vLLM's own constructor needs a whole engine; it only keeps the config
        self.vllm_config = vllm_config

    monkeypatch.setattr(base, "__init__", base_init)
    with pytest.raises(ConfigError, match=f"HeadRouter's {component} needs a 'headrouter' section.*--additional"):
        cls(vllm_config) if component == "model runner" else cls()
    assert HeadRouterConfig.required_from_vllm_config(
        types.SimpleNamespace(additional_config={"headrouter": {"retention": 0.5}}), component).retention == 0.5


def test_engine_settings_are_one_list_for_the_config_the_cli_and_the_readme():
    """The serve flags and the README's settings table are made from ``HeadRouterConfig``'s fields: a field added
    to the config without its flag, its doc or its README row fails here."""
    import argparse
    from pathlib import Path

    from headrouter_vllm.cli import add_engine_settings
    from headrouter_vllm.config import settings
    from headrouter_vllm.names import ATTENTION, MODES, PROBE_POINTS, SEMANTICS

    fields = [s.name for s in settings()]
    assert fields == [f.name for f in dataclasses.fields(HeadRouterConfig)]
    assert all(s.doc for s in settings()), [s.name for s in settings() if not s.doc]
    choices = {s.name: s.choices for s in settings() if s.choices}
    assert choices == {"mode": MODES, "semantics": SEMANTICS, "probe_point": PROBE_POINTS, "attention": ATTENTION}
    parser = argparse.ArgumentParser()
    add_engine_settings(parser)
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    assert flags == {s.name for s in settings() if s.cli} == set(fields) - {"seed", "record_probes"}
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("### Engine settings", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)
    assert sorted(rows) == sorted(fields) and len(rows) == len(set(rows)), (rows, fields)
