"""Tune the ``coverage`` policy's settings per task group on validation clips (never test clips).

Every grid point gives all groups the same settings and runs ``coverage:named`` on every validation question at
each retention through the engine; each group then takes the grid point with the best accuracy on its own
questions (mean over retentions). Ties go to the larger ``floor`` (closer to ``uniform``, the safer choice), then
to fewer segments. ``mixed`` takes the point that is best over all questions. The settings are written into the
profile file, where the engine's ``coverage`` policy reads them (``Coverage.mix`` by the routed group weights).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

from headrouter_vllm.routing.profiles import ProfileSet
from headrouter_vllm.routing.select import Coverage
from headrouter_vllm.routing.tasks import GROUPS

# floor 1.0 is exactly uniform whatever the segments, so it is one point.
DEFAULT_GRID = [Coverage(1, 1.0)] + [Coverage(s, f) for s, f in itertools.product((4, 8, 16), (0.0, 0.25, 0.5, 0.75))]


def parse_grid(floors: list[float], segments: list[int]) -> list[Coverage]:
    points = {Coverage(1, 1.0)} if 1.0 in floors else set()
    points |= {Coverage(s, f) for s, f in itertools.product(segments, floors) if f < 1.0}
    return sorted(points, key=lambda c: (c.floor, c.segments))


def choose(accuracy: dict[Coverage, dict[str, float]]) -> dict[str, Coverage]:
    """Per group, the grid point with the best accuracy; ``accuracy[point][group]`` (``"all"`` for mixed)."""
    def best(key: str) -> Coverage:
        return max(accuracy, key=lambda c: (round(accuracy[c].get(key, 0.0), 9), c.floor, -c.segments))

    return {g: best("all" if g == "mixed" else g) for g in GROUPS}


def tune_coverage(model: str, clips: list, profiles: Path, retentions: list[float], grid: list[Coverage],
                  engine_kwargs: dict, work: Path, progress=None) -> dict:
    """Run the grid on ``clips``, write the chosen settings into ``profiles`` (in place); return the record."""
    from headrouter_vllm.benchmarks.quality.run import Method, run_methods
    from headrouter_vllm.listening.suite import TASK_GROUPS

    base = ProfileSet.load(profiles)
    chosen_methods = [Method("coverage", r, task="named") for r in retentions]
    accuracy: dict[Coverage, dict[str, float]] = {}
    for point in grid:
        variant = work / f"coverage-s{point.segments}-f{point.floor}.json"
        dataclasses.replace(base, coverage={g: point for g in GROUPS}).save(variant)
        answers = run_methods(model, clips, chosen_methods, "after_prompt", str(variant), engine_kwargs)
        by_group: dict[str, list[bool]] = {"all": []}
        for a in answers:
            by_group.setdefault(TASK_GROUPS[a.task], []).append(a.correct)
            by_group["all"].append(a.correct)
        accuracy[point] = {g: 100.0 * sum(v) / len(v) for g, v in by_group.items()}
        if progress is not None:
            progress.update(1)
    settings = choose(accuracy)
    dataclasses.replace(base, coverage=settings).save(profiles)
    return {"clips": len(clips), "retentions": retentions,
            "chosen": {g: dataclasses.asdict(c) for g, c in settings.items()},
            "grid": [{**dataclasses.asdict(c), **{k: round(v, 2) for k, v in accuracy[c].items()}} for c in grid]}
