"""``headrouter-vllm quality``: accuracy vs retention on the listening suite, every method through the vLLM engine.

For each model (default: both training seeds of ``listening-qwen2-audio``): head profiles are calibrated on
validation clips (``headrouter-vllm calibrate``, never on test clips), then every test question runs at full
audio and, per retention, under each policy; ``headrouter:named`` sends the question's suite task (routed by
its calibrated profile), ``headrouter:auto`` lets the input alone route. Answers are greedy; an answer is right
on an exact match of ``<tag> <value>``. Results: ``summary.{md,csv,json}``, ``answers.csv`` and
``accuracy_vs_retention.png`` under ``<out>/<machine>/<name>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

# region: the oracle spread (kept tokens evenly over the part of the clip a question is about: the suite's labels)
DEFAULT_POLICIES = ["headrouter:named", "headrouter:auto", "oracle", "fastv", "random", "uniform", "similarity",
                    "region"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["listening-qwen2-audio", "listening-qwen2-audio-seed1"],
                        help="make-model names or model directories")
    parser.add_argument("--clips", type=int, default=150, help="clips of --split (each asked all its 6 questions)")
    parser.add_argument("--split", choices=["test", "validation"], default="test",
                        help="validation: for tuning a policy's settings (its first --calibration-clips clips also "
                             "calibrate the profiles); report on test")
    parser.add_argument("--calibration-clips", type=int, default=40, help="validation clips for the profiles")
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.7, 0.5, 0.3, 0.2, 0.1])
    parser.add_argument("--tune-coverage", action="store_true",
                        help="before the run, tune the coverage policy's settings per task group on --tune-clips "
                             "further validation clips (disjoint from calibration and test) and serve them")
    parser.add_argument("--tune-clips", type=int, default=64, help="validation clips for --tune-coverage")
    parser.add_argument("--coverage-floors", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="--tune-coverage grid: floor values (1.0 = uniform)")
    parser.add_argument("--coverage-segments", type=int, nargs="+", default=[4, 8, 16],
                        help="--tune-coverage grid: window counts")
    parser.add_argument("--tune-probe-points", nargs="+", choices=["prompt", "first_token"],
                        default=["prompt", "first_token"], help="--tune-coverage grid: probe points")
    parser.add_argument("--tuning-from", default=None, metavar="SUMMARY_JSON",
                        help="--tune-coverage: take the validation grid's accuracies from an earlier run's "
                             "summary.json (same models, tuning clips and retentions: checked) instead of measuring "
                             "them again; grid points it lacks are measured, and the choice is made anew"),
    parser.add_argument("--tune-retention", action="store_true",
                        help="after calibration (and --tune-coverage), choose the retention table of retention "
                             "'auto' on the --tune-clips validation clips: per task group and task, the smallest "
                             "--retention-candidates entry that, with every larger one, stays within "
                             "--retention-tolerance points of full audio; then "
                             "--auto-retention-policies run at retention auto on the test clips")
    parser.add_argument("--retention-candidates", type=float, nargs="+", default=[0.7, 0.5, 0.3, 0.2, 0.1],
                        help="--tune-retention: the retentions it chooses from")
    parser.add_argument("--retention-tolerance", type=float, default=2.0,
                        help="--tune-retention: accuracy points below full audio a chosen retention may lose")
    parser.add_argument("--auto-retention-policies", nargs="+",
                        default=["coverage:named", "coverage:auto", "uniform:named", "uniform"],
                        help="--tune-retention: policy[:named|auto] run at retention auto (uniform at the same "
                             "retentions is the paired baseline: uniform:named for named tasks)")
    parser.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES,
                        help="policy[:named|auto][@prompt|first_token|routed] under after_prompt semantics (no @: "
                             "the engine's probe point, which a tuned profile file may set)")
    parser.add_argument("--in-prompt-policies", nargs="*", default=["headrouter:named", "uniform"],
                        help="policy[:named|auto] under in_prompt semantics (none: skip)")
    parser.add_argument("--prefill-policies", nargs="*", default=[],
                        help="policy[:named|auto][@prompt] under prefill semantics (above the probe layer the prompt "
                             "step does not compute the dropped audio rows; only the prompt probe point applies)")
    parser.add_argument("--per-head-policies", nargs="*", default=[],
                        help="policy[:named|auto] in per_head mode (HeadRouter's backend, torch references on CPU)")
    parser.add_argument("--holdout-tasks", nargs="+", default=[], metavar="TASK",
                        help="suite tasks no calibration or tuning question comes from: a second profile file is "
                             "calibrated (and tuned) without them, and --holdout-policies run with it; the report "
                             "gives these tasks' questions apart ('holdout' columns)")
    parser.add_argument("--holdout-policies", nargs="+", default=["coverage:auto", "coverage:group"],
                        help="policy[:group|auto] run with the held-out profile file (group: the question's task "
                             "group, semantic or acoustic, what a user of a task no profile knows can name)")
    parser.add_argument("--test-phrasings", nargs="+", default=None, metavar="SUMMARY_JSON",
                        help="held-out phrasings: ask each test question whose task has an answered rewording in "
                             "the model's phrasing check summary.json (python -m "
                             "headrouter_vllm.benchmarks.quality.phrasings; one file for every model, or one per "
                             "--models entry, in order) in that wording; calibration and tuning keep the training's")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results", help="results root: <out>/<machine>/<name>/")
    parser.add_argument("--name", default=None, help="run name (default: quality-<timestamp>)")


def _model_dir(name: str, tmp: Path) -> str:
    if os.path.isdir(name):
        return name
    from headrouter_vllm.models.build import make_model

    return str(make_model(name, tmp / name))


def calibration_manifest(clips: list, folder: Path, skip_tasks: tuple[str, ...] = ()) -> Path:
    """Validation clips as wav files and a calibrate manifest: one line per (clip, question), task = suite task;
    none of ``skip_tasks``' questions."""
    from headrouter_vllm.listening import suite

    suite.save_waves(clips, folder / "clips")
    lines = [json.dumps({"audio": f"clips/{c.id}.wav", "task": task, "group": suite.TASK_GROUPS[task],
                         "question": suite.QUESTIONS[task]}) for c in clips for task in c.answers
             if task not in skip_tasks]
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(args: argparse.Namespace) -> list[dict]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm

    from headrouter_vllm.benchmarks.quality import report
    from headrouter_vllm.benchmarks.quality.run import methods, run_methods
    from headrouter_vllm.benchmarks.quality.tune import measured_grid, parse_grid, tune_coverage, tune_retention
    from headrouter_vllm.benchmarks.serving.report import machine, machine_slug, source_state
    from headrouter_vllm.calibrate import calibrate
    from headrouter_vllm.listening import suite

    source = source_state()  # the code that runs: read now, before anyone edits the tree during a long run
    holdout = tuple(dict.fromkeys(args.holdout_tasks))
    unknown = [t for t in holdout if t not in suite.TASK_GROUPS]
    if unknown:
        raise ValueError(f"--holdout-tasks {unknown}: the suite's tasks are {', '.join(suite.TASK_GROUPS)}")
    for group in sorted(set(suite.TASK_GROUPS.values())):
        if all(t in holdout for t, g in suite.TASK_GROUPS.items() if g == group):
            raise ValueError(f"--holdout-tasks holds out every {group} task: that group would have no profile")
    for r in args.retention_candidates:
        if not 0.0 < r < 1.0:
            raise ValueError(f"--retention-candidates: each must be in (0, 1), got {r}")
    chosen = methods(args.retentions, args.policies, args.in_prompt_policies, args.per_head_policies,
                     args.holdout_policies if holdout else (),
                     args.auto_retention_policies if args.tune_retention else (), args.prefill_policies)
    phrasings = {}  # model -> each task's test wording
    if args.test_phrasings:
        files = args.test_phrasings * len(args.models) if len(args.test_phrasings) == 1 else args.test_phrasings
        if len(files) != len(args.models):
            raise ValueError(f"--test-phrasings: give one file, or one per model ({len(args.models)}), "
                             f"not {len(args.test_phrasings)}")
        phrasings = {name: {**suite.QUESTIONS, **json.loads(Path(f).read_text())["answered"]}
                     for name, f in zip(args.models, files, strict=True)}
    clips = suite.generate(args.split, args.clips, progress=True)
    engine_kwargs = dict(dtype="float32", max_model_len=1024, block_size=32, enforce_eager=True, seed=0,
                         limit_mm_per_prompt={"audio": 1}, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=8192)
    info = machine()
    out = Path(args.out) / machine_slug(info) / (args.name or time.strftime("quality-%Y%m%d-%H%M%S"))
    # Clip i of a split is the same clip whatever the count, so calibration and tuning clips are disjoint.
    tunes = args.tune_coverage or args.tune_retention
    validation = suite.generate("validation", args.calibration_clips + (args.tune_clips if tunes else 0))
    calibration = [c for c in validation if int(c.id.removeprefix("validation")) < args.calibration_clips]
    tuning = [c for c in validation if int(c.id.removeprefix("validation")) >= args.calibration_clips]
    grid = parse_grid(args.coverage_floors, args.coverage_segments)
    answers, tuned, tuned_retention, t0 = [], {}, {}, time.time()
    with tempfile.TemporaryDirectory(prefix="headrouter-quality-") as tmp:
        tmp = Path(tmp)
        manifest = calibration_manifest(calibration, tmp / "calibration")
        holdout_manifest = calibration_manifest(calibration, tmp / "calibration-holdout", holdout) if holdout else None
        engines = sorted({m.engine for m in chosen})
        progress = tqdm(total=len(clips) * len(engines) * len(args.models), desc="clips x engines", unit="clip")
        for name in args.models:
            model = _model_dir(name, tmp)
            label = Path(name).name
            files = {"seen": (tmp / f"{label}-profiles.json", manifest, ())}
            if holdout:
                files["holdout"] = (tmp / f"{label}-profiles-holdout.json", holdout_manifest, holdout)
            for variant, (profiles, variant_manifest, skip) in files.items():
                calibrate(model, variant_manifest, profiles)
                if args.tune_coverage:
                    key = label if variant == "seen" else f"{label} (without {', '.join(holdout)})"
                    measured = None if args.tuning_from is None or skip else measured_grid(
                        args.tuning_from, label, len(tuning), args.retentions, grid, args.tune_probe_points)
                    points = len(args.tune_probe_points) * len(grid) - len(measured or {})
                    with tqdm(total=points, desc=f"tuning coverage ({key})", unit="point") as bar:
                        tuned[key] = tune_coverage(model, tuning, profiles, args.retentions, grid, engine_kwargs,
                                                   tmp, tuple(args.tune_probe_points), progress=bar, measured=measured,
                                                   skip_tasks=skip)
                    print(f"{key}: tuned on {len(tuning)} validation clips: probe point "
                          f"{tuned[key]['probe_point']}, coverage {tuned[key]['chosen']}")
                if args.tune_retention and variant == "seen":
                    with tqdm(total=len(tuning), desc=f"tuning retention ({label})", unit="clip") as bar:
                        tuned_retention[label] = tune_retention(model, tuning, profiles, args.retention_candidates,
                                                                args.retention_tolerance, engine_kwargs, tmp,
                                                                progress=bar)
                    print(f"{label}: retention table from {len(tuning)} validation clips: "
                          f"{tuned_retention[label]['chosen']}")
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy(profiles, out / profiles.name)  # the profile file the methods ran with: servable
            for semantics, mode, variant in engines:
                mine = [m for m in chosen if m.engine == (semantics, mode, variant)]
                for a in run_methods(model, clips, mine, semantics, str(files[variant][0]), engine_kwargs,
                                     progress=progress, mode=mode, questions=phrasings.get(name)):
                    a.model = label
                    answers.append(a)
        progress.close()
    # model -> the questions asked in a wording other than the training's
    reworded = {name: {t: q for t, q in asked.items() if q != suite.QUESTIONS[t]} for name, asked in phrasings.items()}
    rows = [row for name in args.models
            for row in report.summarise([a for a in answers if a.model == Path(name).name], Path(name).name,
                                        holdout, tuple(reworded.get(name, ())))]
    command = "headrouter-vllm quality " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["quality"] else sys.argv[1:])
    meta = {"command": command, "machine": info, "source": source, "split": args.split, "clips": len(clips),
            "questions_per_method": sum(len(c.answers) for c in clips), "seconds": round(time.time() - t0),
            "methods": [m.label for m in chosen], **({"coverage_tuning": tuned} if tuned else {}),
            **({"retention_tuning": tuned_retention} if tuned_retention else {}),
            **({"holdout_tasks": list(holdout)} if holdout else {}),
            **({"test_phrasings": {Path(name).name: asked for name, asked in reworded.items()}} if reworded else {})}
    report.write(out, rows, answers, meta)
    print(report.markdown(rows))
    print(report.versus_uniform(rows))
    print(f"\nwrote {out}")
    return rows
