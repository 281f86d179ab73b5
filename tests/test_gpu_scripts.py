"""The GPU check kit, rehearsed on CPU so that it cannot rot: ``scripts/gpu_engine_check.py`` (vanilla vs HeadRouter,
with and without CUDA graph replay, on one device) runs end to end on CPU_ATTN and its checks pass."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_engine_check.py"


def test_gpu_engine_check_rehearses_on_cpu(tiny_model, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_engine_check", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    status = script.main(["--cpu-rehearsal", "--out", str(tmp_path), "--model", tiny_model, "--new-tokens", "4",
                          "--engines", "vanilla", "headrouter", "headrouter_no_graphs"])
    report = json.loads((tmp_path / "engine-check.json").read_text())
    assert status == 0 and report["failures"] == []
    engines = report["engines"]
    assert engines["headrouter"]["attention_impls"] == ["CPUAttentionBackendImpl"]
    assert engines["headrouter"]["requests"]["long_r0.3"]["report"]["kv_blocks_freed"] > 0
    # the check compares what it should: a changed token is reported
    engines["headrouter_no_graphs"]["requests"]["long_r0.3"]["tokens"][0] += 1
    assert script.check(engines) == ["long_r0.3: tokens differ with and without CUDA graph replay"]
