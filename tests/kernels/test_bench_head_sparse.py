"""The kernel benchmark's harness: its smoke mode runs here (CPU, Triton interpreter) and writes its CSV."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from tests.kernels.conftest import ON_GPU

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "bench_head_sparse.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_head_sparse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_head_budgets_keep_the_mean(bench) -> None:
    for fraction in (1.0, 0.7, 0.5, 0.3):
        budgets = bench.head_budgets(fraction, 1000, 4)
        assert abs(budgets.float().mean().item() - 1000 * fraction) <= 1 and budgets.max() <= 1000
    assert bench.head_budgets(1.0, 500, 32).eq(500).all()


@pytest.mark.skipif(ON_GPU, reason="the CPU refusal and smoke mode")
def test_refuses_without_gpu_and_runs_smoke_mode(bench, tmp_path) -> None:
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--out", str(tmp_path / "no.csv")])
    rows = bench.main(["--smoke", "--out", str(tmp_path / "smoke.csv")])
    with open(tmp_path / "smoke.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) == 9  # SDPA baseline + 4 kept fractions x (skip, packed layout)
    sparse = [r for r in written if r["impl"] == "head_sparse"]
    packed = [r for r in written if r["impl"] == "head_sparse_packed"]
    assert [r["bytes_read"] for r in packed] == [r["bytes_read"] for r in sparse]  # the same keys, packed
    assert [float(r["kept_fraction"]) for r in sparse] == [1.0, 0.7, 0.5, 0.3]
    assert all(r["device"].startswith("cpu") and float(r["speedup_vs_sdpa_gathered"]) > 0 for r in sparse)
    read = [int(r["bytes_read"]) for r in sparse]
    assert read == sorted(read, reverse=True)  # fewer kept slots, fewer bytes
    prefill = bench.main(["--smoke", "--prefill-lengths", "40", "--tile-slots", "0", "32",
                          "--out", str(tmp_path / "prefill.csv")])
    assert [r["impl"] for r in prefill] == ["sdpa_causal", "head_sparse_prefill_tiledefault",
                                             "head_sparse_prefill_tile32"]
    assert all(r["tflop_s"] > 0 for r in prefill)


@pytest.mark.skipif(ON_GPU, reason="the CPU refusal and smoke mode")
def test_route_ops_bench_runs_smoke_mode(tmp_path) -> None:
    script = SCRIPT.with_name("bench_route_ops.py")
    spec = importlib.util.spec_from_file_location("bench_route_ops", script)
    route_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(route_ops)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        route_ops.main(["--out", str(tmp_path / "no.csv")])
    rows = route_ops.main(["--smoke", "--out", str(tmp_path / "smoke.csv")])
    assert [r["op"] for r in rows] == ["prefill_attention_sdpa", "probe"] + ["compact_tiledefault"] * 3
    moved = [r["bytes_moved"] for r in rows[2:]]
    assert moved == sorted(moved, reverse=True) and all(r["time_us"] > 0 for r in rows)
    kept = route_ops.kept_slot_lists(torch.tensor([3, 5]), span_start=16, span=10)
    assert kept.tolist()[0][0][3:] == [-1, -1] and all(16 <= s < 26 for s in kept[kept >= 0].tolist())
    assert all(row == sorted(row) for row in kept[0, :, :3].tolist())
