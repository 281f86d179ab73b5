"""Tune the ``coverage`` policy's settings per task group, and the probe point, on validation clips (never test).

Every grid point (a probe point and one setting for all groups) runs ``coverage:named`` on every validation
question at each retention through the engine. Each group takes the probe point and setting with the best accuracy
on its own questions (mean over retentions; ties go to the ``prompt`` probe, then to the larger ``floor``, closer to
``uniform``, the safer choice, then to fewer segments); ``mixed`` takes the best over all questions, and requests
routed ``auto`` use its probe point. Where the groups' probe points differ and the profile file has a group router,
``mixed`` may then take ``routed`` instead (:func:`tune_routed`). The settings and the probe points are written into
the profile file, where the engine's ``coverage`` policy reads them (``Coverage.mix`` by the routed group weights)
and requests that name no probe point use their task group's.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

from headrouter_vllm.routing.profiles import ProfileSet
from headrouter_vllm.routing.select import Coverage
from headrouter_vllm.routing.tasks import GROUPS

UNIFORM = Coverage(1, 1.0)  # floor 1.0 is exactly uniform whatever the segments: one point per probe point


def parse_grid(floors: list[float], segments: list[int]) -> list[Coverage]:
    points = {UNIFORM} if 1.0 in floors else set()
    points |= {Coverage(s, f) for s, f in itertools.product(segments, floors) if f < 1.0}
    return sorted(points, key=lambda c: (c.floor, c.segments))


def choose(accuracy: dict[Coverage, dict[str, float]]) -> dict[str, Coverage]:
    """Per group, the grid point with the best accuracy; ``accuracy[point][group]`` (``"all"`` for mixed)."""
    def best(key: str) -> Coverage:
        return max(accuracy, key=lambda c: (round(accuracy[c].get(key, 0.0), 9), c.floor, -c.segments))

    return {g: best("all" if g == "mixed" else g) for g in GROUPS}


def choose_probe_points(accuracy: dict[str, dict[Coverage, dict[str, float]]]
                        ) -> tuple[dict[str, str], dict[str, Coverage]]:
    """``accuracy[probe_point][point][group]`` -> per group, the winning probe point and setting."""
    points, settings = {}, {}
    for group in GROUPS:
        key = "all" if group == "mixed" else group
        best = max(((pp, c) for pp in accuracy for c in accuracy[pp]),
                   key=lambda pc: (round(accuracy[pc[0]][pc[1]].get(key, 0.0), 9), pc[0] == "prompt", pc[1].floor,
                                   -pc[1].segments))
        points[group], settings[group] = best
    return points, settings


def measured_grid(summary_json: str | Path, label: str, clips: int, retentions: list[float], grid: list[Coverage],
                  probe_points: list[str]) -> dict[tuple[str, Coverage], dict[str, float]]:
    """The validation accuracies an earlier run measured for ``label`` (its ``summary.json``) at this run's grid
    points (the others are left out; points it did not measure are measured again), refusing a record of other clips
    or retentions."""
    record = json.loads(Path(summary_json).read_text()).get("coverage_tuning", {}).get(label)
    if record is None:
        raise SystemExit(f"{summary_json} has no coverage tuning for {label}")
    if record["clips"] != clips or record["retentions"] != list(retentions):
        raise SystemExit(f"{summary_json}: {label} was tuned on {record['clips']} clips at r = {record['retentions']}, "
                         f"not {clips} at r = {list(retentions)}")
    measured = {(p.get("probe_point", "prompt"), Coverage(p["segments"], p["floor"])):
                {k: p[k] for k in ("semantic", "acoustic", "all") if k in p} for p in record["grid"]}
    wanted = {(pp, c) for pp in probe_points for c in grid}
    return {key: value for key, value in measured.items() if key in wanted}


def tune_coverage(model: str, clips: list, profiles: Path, retentions: list[float], grid: list[Coverage],
                  engine_kwargs: dict, work: Path, probe_points: tuple[str, ...] = ("prompt",),
                  progress=None, measured: dict | None = None, skip_tasks: tuple[str, ...] = ()) -> dict:
    """Run the grid on ``clips``, write the chosen settings into ``profiles`` (in place); return the record.
    ``measured``: the grid's accuracies from an earlier run on the same clips (:func:`measured_grid`), not rerun.
    ``skip_tasks``: tasks whose questions the tuning never asks (held out)."""
    from headrouter_vllm.benchmarks.quality.run import Method, run_methods
    from headrouter_vllm.listening.suite import TASK_GROUPS

    base = ProfileSet.load(profiles)
    # uniform runs at every probe point too: the probe point also moves when pruning starts (first_token: one
    # step later), which changes accuracy whatever is kept, so each probe point is compared with its own uniform
    measured = dict(measured or {})
    runs = [(pp, c) for pp in probe_points for c in grid if (pp, c) not in measured]
    for probe_point, point in runs:
        variant = work / f"coverage-{probe_point}-s{point.segments}-f{point.floor}.json"
        dataclasses.replace(base, coverage={g: point for g in GROUPS}).save(variant)
        methods = [Method("coverage", r, task="named", probe_point=probe_point) for r in retentions]
        answers = run_methods(model, clips, methods, "after_prompt", str(variant), engine_kwargs,
                              skip_tasks=skip_tasks)
        by_group: dict[str, list[bool]] = {"all": []}
        for a in answers:
            by_group.setdefault(TASK_GROUPS[a.task], []).append(a.correct)
            by_group["all"].append(a.correct)
        measured[(probe_point, point)] = {g: 100.0 * sum(v) / len(v) for g, v in by_group.items()}
        if progress is not None:
            progress.update(1)
    accuracy = {pp: {c: measured[(pp, c)] for c in grid} for pp in probe_points}
    points, settings = choose_probe_points(accuracy)
    probe_point = points["mixed"] if len(set(points.values())) == 1 else points  # one for all, or per group
    dataclasses.replace(base, coverage=settings, probe_point=probe_point).save(profiles)
    routed = None
    if base.router is not None and points["semantic"] != points["acoustic"]:
        routed = tune_routed(model, clips, profiles, retentions, engine_kwargs, work, skip_tasks)
        probe_point = ProfileSet.load(profiles).probe_point
    return {"clips": len(clips), "retentions": retentions, "probe_point": probe_point,
            **({"without_tasks": list(skip_tasks)} if skip_tasks else {}),
            **({"routed": routed} if routed else {}),
            "chosen": {g: dataclasses.asdict(c) for g, c in settings.items()},
            "grid": [{"probe_point": pp, **dataclasses.asdict(c), **{k: round(v, 2) for k, v in acc.items()}}
                     for (pp, c), acc in measured.items()]}


def tune_routed(model: str, clips: list, profiles: Path, retentions: list[float], engine_kwargs: dict, work: Path,
                skip_tasks: tuple[str, ...] = ()) -> dict:
    """Where the groups' probe points differ and the file has a group router: ``auto`` requests (the ``mixed``
    group) on ``clips`` at the tuned ``mixed`` probe point and at ``routed`` (the router's group picks the rows), on
    every question at each retention; ``mixed`` takes ``routed`` if its accuracy is higher (a tie keeps the fixed
    point). Writes the choice into ``profiles``; returns both accuracies and the router's group accuracy."""
    from headrouter_vllm.benchmarks.quality.run import Method, run_methods
    from headrouter_vllm.listening.suite import TASK_GROUPS

    tuned = ProfileSet.load(profiles)
    fixed = tuned.probe_point["mixed"]
    variant = work / f"routed-{profiles.name}"
    dataclasses.replace(tuned, probe_point={**tuned.probe_point, "mixed": "routed"}).save(variant)
    methods = [Method("coverage", r, task="auto", probe_point=point) for r in retentions for point in (fixed, "routed")]
    answers = run_methods(model, clips, methods, "after_prompt", str(variant), engine_kwargs, skip_tasks=skip_tasks)
    accuracy, to_group = {}, {}
    for point in (fixed, "routed"):
        mine = [a for a in answers if a.method.endswith(f"@{point}")]
        accuracy[point] = round(100.0 * sum(a.correct for a in mine) / len(mine), 2)
        to_group[point] = round(100.0 * sum(a.routed_group == TASK_GROUPS[a.task] for a in mine) / len(mine), 1)
    chosen = "routed" if accuracy["routed"] > accuracy[fixed] else fixed
    dataclasses.replace(tuned, probe_point={**tuned.probe_point, "mixed": chosen}).save(profiles)
    return {"accuracy": accuracy, "routed_to_group": to_group, "chosen": chosen}


def tune_retention(model: str, clips: list, profiles: Path, candidates: list[float], tolerance: float,
                   engine_kwargs: dict, work: Path, skip_tasks: tuple[str, ...] = (), progress=None) -> dict:
    """Choose the retention table of ``retention: "auto"`` on ``clips`` (validation), write it into ``profiles``.

    One engine serves the profile file as it is (tuned coverage and probe points included) at full audio and, at each
    candidate retention, ``coverage`` with the question's task named and with ``auto`` routing. Each task, and each
    group (``semantic`` / ``acoustic``: its tasks' questions, named), takes the smallest candidate that, with every
    larger one, keeps accuracy at least full audio's on the same questions minus ``tolerance`` points (1.0 when the
    largest does not: ``smallest_within``); ``mixed``, the group of requests routed ``auto``, is chosen from the
    ``auto`` answers on every question."""
    from headrouter_vllm.benchmarks.quality.run import Method, run_methods
    from headrouter_vllm.listening.suite import TASK_GROUPS
    from headrouter_vllm.routing.retention import RetentionTable, smallest_within

    methods = [Method("uniform", 1.0)] + [Method("coverage", r, task=spec) for r in candidates
                                           for spec in ("named", "auto")]
    # a copy: a process reads a profile file once per path (scheduler and runner must agree on it), and the
    # engines after this one read ``profiles`` with the table in it
    served = work / f"retention-tuning-{profiles.name}"
    shutil.copy(profiles, served)
    answers = run_methods(model, clips, methods, "after_prompt", str(served), engine_kwargs, skip_tasks=skip_tasks,
                          progress=progress)
    cells: dict[tuple[str, float], dict[str, list[bool]]] = {}
    for a in answers:
        for key in (a.task, TASK_GROUPS[a.task], "all"):
            cells.setdefault((a.method, a.retention), {}).setdefault(key, []).append(a.correct)

    def accuracy(method: str, retention: float, key: str) -> float:
        hits = cells.get((method, retention), {}).get(key, [])
        return 100.0 * sum(hits) / len(hits) if hits else float("nan")

    def choice(method: str, key: str) -> tuple[float, dict]:
        full = accuracy("full", 1.0, key)
        measured = {r: accuracy(method, r, key) for r in candidates}
        return smallest_within(measured, full, tolerance), {"full": round(full, 2),
                                                           **{str(r): round(a, 2) for r, a in measured.items()}}

    tasks = sorted({a.task for a in answers})
    rows, groups, per_task = {}, {}, {}
    for group in ("semantic", "acoustic"):
        groups[group], rows[group] = choice("coverage[named]", group)
    groups["mixed"], rows["mixed (auto routing)"] = choice("coverage[auto]", "all")
    for task in tasks:
        per_task[task], rows[task] = choice("coverage[named]", task)
    table = RetentionTable(groups, per_task, tolerance)
    base = ProfileSet.load(profiles)
    dataclasses.replace(base, retention=table).save(profiles)
    return {"clips": len(clips), "candidates": list(candidates), "tolerance": tolerance,
            **({"without_tasks": list(skip_tasks)} if skip_tasks else {}), "chosen": table.to_json(),
            "accuracy": rows}
