"""Summaries, the physical ceiling, and the table / CSV / JSON / plots of a benchmark run."""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import numpy as np

from headrouter_vllm.benchmarks.serving.run import RunResult


def machine() -> dict:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        pass
    return info


def source_state() -> dict:
    """The git commit the run's code came from and whether the tree had uncommitted changes (``None``s outside a
    git checkout), so a result can be traced to the code that produced it."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def machine_slug(info: dict) -> str:
    name = info.get("gpu") or info["cpu"]
    return re.sub(r"[^a-z0-9]+", "-", f"{name}-{info['cores']}core".lower()).strip("-")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(run: RunResult, audio_tokens: dict[int, int]) -> dict:
    reqs = run.requests
    n = len(reqs)
    kv_tokens = []  # KV slots a request needs at its end: ideal model of what pruning can save
    for r in reqs:
        audio = audio_tokens.get(r.index, 0)
        kept = audio if run.retention is None else (r.kept_tokens if r.kept_tokens is not None else audio)
        kv_tokens.append(r.prompt_tokens - audio + kept + r.output_tokens)
    return {
        "label": run.label, "retention": run.retention, "semantics": run.semantics, "mode": run.mode,
        "policy": run.policy, "requests": n,
        "encoder_window": run.encoder_window, "prefix_caching": run.prefix_caching,
        "duration_s": run.duration,
        "request_throughput": n / run.duration,
        "output_throughput": sum(r.output_tokens for r in reqs) / run.duration,
        "ttft_p50_ms": pct([r.ttft * 1e3 for r in reqs], 50), "ttft_p99_ms": pct([r.ttft * 1e3 for r in reqs], 99),
        # later turns of a conversation: what a chat user waits for after each follow-up question
        "ttft_followup_p50_ms": pct([r.ttft * 1e3 for r in reqs if r.turn], 50) if any(r.turn for r in reqs) else None,
        "prompt_tokens_mean": float(np.mean([r.prompt_tokens for r in reqs])),
        "cached_share": sum(r.cached_tokens for r in reqs) / max(1, sum(r.prompt_tokens for r in reqs)),
        "tpot_p50_ms": pct([r.tpot * 1e3 for r in reqs], 50), "tpot_p99_ms": pct([r.tpot * 1e3 for r in reqs], 99),
        "latency_p50_s": pct([r.latency for r in reqs], 50), "latency_p99_s": pct([r.latency for r in reqs], 99),
        "kv_blocks_per_request": float(np.mean([r.peak_blocks for r in reqs])),
        "kv_tokens_per_request": float(np.mean(kv_tokens)),
        "max_running": run.max_running, "preemptions": run.preemptions, "pool_blocks": run.pool_blocks,
        "audio_tokens_mean": float(np.mean([audio_tokens.get(r.index, 0) for r in reqs])),
        "audio_kept_mean": _mean([r.kept_tokens for r in reqs if r.kept_tokens is not None]),
        "probe_ms_mean": _mean(run.probe_ms),
        "compact_ms_mean": _mean(run.compact_ms),
        **_profile(run),
    }


def _profile(run: RunResult) -> dict:
    """The step profile's shares of the run's wall time, and the decode-only steps' mean batch and time."""
    p = run.profile
    other = max(0.0, run.duration - p.input_s - p.prefill_s - p.decode_s)
    return {"input_s": p.input_s, "prefill_s": p.prefill_s, "decode_s": p.decode_s, "other_s": other,
            "prefill_steps": p.prefill_steps, "decode_steps": p.decode_steps,
            "decode_batch_mean": p.decode_rows / p.decode_steps if p.decode_steps else None,
            "decode_step_ms": 1e3 * p.decode_s / p.decode_steps if p.decode_steps else None,
            "decoding_max": p.decoding_max,
            "decoding_mean": p.decoding_mean}


def add_ratios(rows: list[dict]) -> None:
    """Gains over vanilla: measured, the ceiling (vanilla KV per request / pruned KV per request), and the Amdahl
    bound: the best request-throughput gain a decode-side saving can give, if vanilla's decode time shrank by the
    whole ceiling and its input processing, prefill and the rest did not shrink at all."""
    base = next(r for r in rows if r["retention"] is None and not r.get("encoder_window"))  # vanilla as shipped
    fixed = (base["duration_s"] - base["decode_s"]) / base["duration_s"] if base["duration_s"] else None
    for row in rows:
        row["ideal_gain"] = base["kv_tokens_per_request"] / row["kv_tokens_per_request"]
        row["amdahl_gain"] = 1.0 / (fixed + (1.0 - fixed) / row["ideal_gain"]) if fixed is not None else None
        row["held_gain"] = row["max_running"] / base["max_running"]
        row["decoding_gain"] = row["decoding_mean"] / base["decoding_mean"] if base["decoding_mean"] else None
        row["throughput_gain"] = row["request_throughput"] / base["request_throughput"]
        row["held_vs_ideal"] = row["held_gain"] / row["ideal_gain"]
        row["throughput_vs_ideal"] = row["throughput_gain"] / row["ideal_gain"]
        row["decoding_vs_ideal"] = row["decoding_gain"] / row["ideal_gain"] if row["decoding_gain"] else None


COLUMNS = [("label", "run", "{}"), ("request_throughput", "req/s", "{:.2f}"), ("output_throughput", "tok/s", "{:.1f}"),
           ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"), ("ttft_followup_p50_ms", "TTFT turn>1 ms", "{:.0f}"),
           ("cached_share", "cached", "{:.0%}"), ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
           ("latency_p99_s", "e2e p99 s", "{:.2f}"), ("kv_blocks_per_request", "KV blk/req", "{:.1f}"),
           ("max_running", "held", "{}"), ("decoding_max", "decoding max", "{}"),
           ("decoding_mean", "decoding mean", "{:.1f}"), ("preemptions", "preempt", "{}"),
           ("ideal_gain", "ideal x", "{:.2f}"), ("held_gain", "held x", "{:.2f}"),
           ("decoding_gain", "decoding x", "{:.2f}"), ("decoding_vs_ideal", "of ideal", "{:.0%}"),
           ("throughput_gain", "req/s x", "{:.2f}"), ("throughput_vs_ideal", "of ideal", "{:.0%}"),
           ("amdahl_gain", "Amdahl x", "{:.2f}")]


PROFILE_COLUMNS = [("label", "run", "{}"), ("duration_s", "wall s", "{:.1f}"), ("input_s", "input s", "{:.1f}"),
                   ("prefill_s", "prefill s", "{:.1f}"), ("prefill_steps", "prefill steps", "{}"),
                   ("decode_s", "decode s", "{:.1f}"), ("decode_steps", "decode steps", "{}"),
                   ("decode_batch_mean", "decode batch", "{:.1f}"), ("decode_step_ms", "ms/decode step", "{:.1f}"),
                   ("probe_ms_mean", "probe ms/req", "{:.1f}"), ("compact_ms_mean", "compact ms/req", "{:.1f}")]


def table(rows: list[dict], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    def cell(value, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    cells = [[h for _, h, _ in columns]] + [[cell(row.get(k), fmt) for k, _, fmt in columns] for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells)


def write(out_dir: Path, rows: list[dict], runs: list[RunResult], meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "summary.json").write_text(json.dumps({**meta, "runs": rows}, indent=1) + "\n")
    with open(out_dir / "requests.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "index", "prompt_tokens", "output_tokens", "ttft_s", "tpot_s", "latency_s",
                         "peak_kv_blocks", "audio_tokens", "kept_tokens", "turn", "cached_tokens"])
        for run in runs:
            for r in run.requests:
                writer.writerow([run.label, r.index, r.prompt_tokens, r.output_tokens, f"{r.ttft:.6f}",
                                 f"{r.tpot:.6f}", f"{r.latency:.6f}", r.peak_blocks, r.audio_tokens, r.kept_tokens,
                                 r.turn, r.cached_tokens])
    plot(out_dir, rows, runs)


def plot(out_dir: Path, rows: list[dict], runs: list[RunResult]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    base = next(r for r in rows if r["retention"] is None and not r.get("encoder_window"))  # vanilla as shipped
    pruned, xs = [], []  # an --order of vanilla runs only has no HeadRouter curve
    for semantics in dict.fromkeys(r["semantics"] for r in rows if r["retention"] is not None):
        pruned = [r for r in rows if r["retention"] is not None and r["semantics"] == semantics]
        xs = [r["retention"] for r in pruned]
        axes[0].plot(xs, [r["request_throughput"] for r in pruned], "o-", label=f"HeadRouter ({semantics})")
    if pruned:
        axes[0].plot(xs, [base["request_throughput"] * r["ideal_gain"] for r in pruned], "k--", label="ceiling")
    axes[0].axhline(base["request_throughput"], color="gray", label="vanilla")
    axes[0].set(xlabel="retention", ylabel="requests / s", title="throughput vs retention")
    axes[0].legend()
    for run in runs:
        lat = np.sort([r.latency for r in run.requests])
        axes[1].plot(lat, np.arange(1, lat.size + 1) / lat.size, label=run.label)
    axes[1].set(xlabel="end-to-end latency (s)", ylabel="fraction of requests", title="latency CDF")
    axes[1].legend()
    axes[2].bar([r["label"] for r in rows], [r["kv_blocks_per_request"] for r in rows])
    axes[2].set(ylabel="peak KV blocks per request", title="KV per request")
    axes[2].tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out_dir / "plots.png", dpi=100)
    plt.close(fig)
