"""Which rewordings of the suite's questions does the listening model answer? (``python -m
headrouter_vllm.benchmarks.quality.phrasings``)

Training asked every task in one wording (``suite.QUESTIONS``); ``suite.PARAPHRASES`` words each question
differently. Full audio, greedy, through vLLM, on validation clips: per task and wording, the accuracy and how often
the answer starts with the task's tag. A rewording counts as **answered** when its accuracy is at least the training
wording's minus ``--tolerance`` points; ``quality --test-phrasings`` then asks test questions in the best answered
rewording of each task that has one (held-out phrasings: no calibration or tuning question is worded so).
Results: ``phrasings.csv`` and ``summary.{md,json}`` under ``<out>/<machine>/<name>/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
from pathlib import Path


def check(model: str, clips: int) -> list[dict]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: the default sizes the KV cache from free memory
    from vllm import LLM, SamplingParams

    from headrouter_vllm.benchmarks.quality.run import MAX_TOKENS
    from headrouter_vllm.listening import suite
    from headrouter_vllm.listening.train import prompt_text

    llm = LLM(model=model, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"audio": 1})
    jobs, prompts = [], []
    for clip in suite.generate("validation", clips):
        for task in clip.answers:
            for wording in (suite.QUESTIONS[task], *suite.PARAPHRASES[task]):
                jobs.append((clip, task, wording))
                prompts.append({"prompt": prompt_text(wording), "multi_modal_data": {"audio": (clip.wave,
                                                                                              suite.SAMPLE_RATE)}})
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=True)
    cells: dict[tuple[str, str], list[int]] = {}
    for (clip, task, wording), out in zip(jobs, outputs, strict=True):
        text = out.outputs[0].text.strip()
        cell = cells.setdefault((task, wording), [0, 0, 0])
        cell[0] += text == clip.answer(task)
        cell[1] += text.split(" ")[0] == task
        cell[2] += 1
    return [{"task": task, "wording": wording, "trained": wording == suite.QUESTIONS[task], "questions": n,
             "accuracy": round(100.0 * right / n, 1), "tag": round(100.0 * tag / n, 1)}
            for (task, wording), (right, tag, n) in cells.items()]


def answered(rows: list[dict], tolerance: float) -> dict[str, str]:
    """Per task, the most accurate rewording within ``tolerance`` points of the training wording (none: left out)."""
    best = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        trained = next(r for r in rows if r["task"] == task and r["trained"])
        good = [r for r in rows if r["task"] == task and not r["trained"]
                and r["accuracy"] >= trained["accuracy"] - tolerance]
        if good:
            best[task] = max(good, key=lambda r: r["accuracy"])["wording"]
    return best


def main(argv: list[str] | None = None) -> None:
    from headrouter_vllm.benchmarks.serving.report import machine, machine_slug, source_state

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="listening model directory (make-model listening-qwen2-audio)")
    p.add_argument("--clips", type=int, default=48, help="validation clips (each asked all its questions)")
    p.add_argument("--tolerance", type=float, default=10.0, help="points below the training wording still answered")
    p.add_argument("--out", default="benchmarks/results", help="results root: <out>/<machine>/<name>/")
    p.add_argument("--name", default="phrasings")
    a = p.parse_args(argv)
    source, info = source_state(), machine()
    rows = check(a.model, a.clips)
    chosen = answered(rows, a.tolerance)
    out = Path(a.out) / machine_slug(info) / a.name
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "phrasings.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    command = "python -m headrouter_vllm.benchmarks.quality.phrasings " + shlex.join(sys.argv[1:] if argv is None
                                                                                      else argv)
    meta = {"command": command, "machine": info, "source": source, "model": a.model, "clips": a.clips,
            "tolerance": a.tolerance, "answered": chosen, "rows": rows}
    (out / "summary.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = ["| task | wording | trained | accuracy | tag |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['wording']} | {'yes' if r['trained'] else ''} | {r['accuracy']:.1f} | "
              f"{r['tag']:.1f} |" for r in rows]
    table = "\n".join(lines)
    (out / "summary.md").write_text(f"# Rewordings the model answers\n\n`{command}`\n\n{table}\n\nAnswered "
                                    f"(within {a.tolerance} points): {json.dumps(chosen)}\n")
    print(table)
    print(f"answered: {chosen}\nwrote {out}")


if __name__ == "__main__":
    main()
