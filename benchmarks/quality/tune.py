"""Tune the ``coverage`` policy's settings per task group, and the probe point, on validation clips (never test).

Every grid point (a probe point and one setting for all groups) runs ``coverage:named`` on every validation
question at each retention through the engine. Per probe point, each group takes the setting with the best
accuracy on its own questions (mean over retentions; ties go to the larger ``floor``, closer to ``uniform``, the
safer choice, then to fewer segments; ``mixed`` takes the best over all questions). The probe point with the
better mean of its group-best accuracies wins (ties: ``prompt``). The settings and the probe point are written
into the profile file, where the engine's ``coverage`` policy reads them (``Coverage.mix`` by the routed group
weights) and requests that name no probe point use it.
"""

from __future__ import annotations

import dataclasses
import itertools
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


def choose_probe_point(accuracy: dict[str, dict[Coverage, dict[str, float]]]) -> tuple[str, dict[str, Coverage]]:
    """``accuracy[probe_point][point][group]`` -> the winning probe point and its per-group settings."""
    def score(probe_point: str) -> float:
        table, chosen = accuracy[probe_point], choose(accuracy[probe_point])
        return sum(table[chosen[g]].get(g, 0.0) for g in ("semantic", "acoustic")) / 2

    winner = max(accuracy, key=lambda pp: (round(score(pp), 9), pp == "prompt"))
    return winner, choose(accuracy[winner])


def tune_coverage(model: str, clips: list, profiles: Path, retentions: list[float], grid: list[Coverage],
                  engine_kwargs: dict, work: Path, probe_points: tuple[str, ...] = ("prompt",),
                  progress=None) -> dict:
    """Run the grid on ``clips``, write the chosen settings into ``profiles`` (in place); return the record."""
    from headrouter_vllm.benchmarks.quality.run import Method, run_methods
    from headrouter_vllm.listening.suite import TASK_GROUPS

    base = ProfileSet.load(profiles)
    # uniform runs at every probe point too: the probe point also moves when pruning starts (first_token: one
    # step later), which changes accuracy whatever is kept, so each probe point is compared with its own uniform
    runs = [(pp, c) for pp in probe_points for c in grid]
    measured: dict[tuple[str, Coverage], dict[str, float]] = {}
    for probe_point, point in runs:
        variant = work / f"coverage-{probe_point}-s{point.segments}-f{point.floor}.json"
        dataclasses.replace(base, coverage={g: point for g in GROUPS}).save(variant)
        methods = [Method("coverage", r, task="named", probe_point=probe_point) for r in retentions]
        answers = run_methods(model, clips, methods, "after_prompt", str(variant), engine_kwargs)
        by_group: dict[str, list[bool]] = {"all": []}
        for a in answers:
            by_group.setdefault(TASK_GROUPS[a.task], []).append(a.correct)
            by_group["all"].append(a.correct)
        measured[(probe_point, point)] = {g: 100.0 * sum(v) / len(v) for g, v in by_group.items()}
        if progress is not None:
            progress.update(1)
    accuracy = {pp: {c: measured[(pp, c)] for c in grid} for pp in probe_points}
    probe_point, settings = choose_probe_point(accuracy)
    dataclasses.replace(base, coverage=settings, probe_point=probe_point).save(profiles)
    return {"clips": len(clips), "retentions": retentions, "probe_point": probe_point,
            "chosen": {g: dataclasses.asdict(c) for g, c in settings.items()},
            "grid": [{"probe_point": pp, **dataclasses.asdict(c), **{k: round(v, 2) for k, v in acc.items()}}
                     for (pp, c), acc in measured.items()]}
