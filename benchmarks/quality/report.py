"""Accuracy tables with 95% intervals, CSV / JSON / markdown and the accuracy-vs-retention plot."""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from headrouter_vllm.listening.suite import TASK_GROUPS
from headrouter_vllm.names import AUTO

Z95 = 1.959964


def wilson(hits: int, n: int) -> tuple[float, float, float]:
    """Accuracy and its 95% Wilson score interval, in percent."""
    if n == 0:
        return math.nan, math.nan, math.nan
    p = hits / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return 100 * p, 100 * (centre - half), 100 * (centre + half)


def group_mean(per_task: dict[str, tuple[int, int]], tasks: list[str]) -> tuple[float, float, float]:
    """Unweighted mean of the tasks' accuracies with a normal 95% interval (tasks are independent samples)."""
    tasks = [t for t in tasks if per_task.get(t, (0, 0))[1]]
    if not tasks:
        return math.nan, math.nan, math.nan
    ps = [per_task[t][0] / per_task[t][1] for t in tasks]
    var = sum(p * (1 - p) / per_task[t][1] for p, t in zip(ps, tasks, strict=True)) / len(tasks) ** 2
    mean = sum(ps) / len(tasks)
    half = Z95 * math.sqrt(var)
    return 100 * mean, 100 * (mean - half), 100 * (mean + half)


GROUPS = {"semantic": [t for t, g in TASK_GROUPS.items() if g == "semantic"],
          "acoustic": [t for t, g in TASK_GROUPS.items() if g == "acoustic"],
          "mean": list(TASK_GROUPS)}


def paired_difference(answers: list, method: str, retention: float | str, base: str = "uniform",
                      resamples: int = 2000, groups: dict[str, list[str]] | None = None,
                      base_retention: float | str | None = None) -> dict[str, tuple]:
    """Accuracy of ``method`` minus ``base`` at ``retention`` on the same questions, per group (the unweighted mean
    of its tasks' mean differences), with a 95% interval from a paired bootstrap over clips (a clip's questions
    are resampled together: they share the audio, so their answers are not independent). Seeded; empty when
    ``base`` did not run at ``retention`` (or ``base_retention``, where given: ``full`` at 1.0)."""
    base_retention = retention if base_retention is None else base_retention
    mine = {(a.clip, a.task): a.correct for a in answers if a.method == method and a.retention == retention}
    theirs = {(a.clip, a.task): a.correct for a in answers if a.method == base and a.retention == base_retention}
    pairs = sorted(mine.keys() & theirs.keys())
    if not pairs:
        return {}
    clips = sorted({c for c, _ in pairs})
    tasks = list(TASK_GROUPS)
    diff = np.full((len(clips), len(tasks)), np.nan)
    row, col = {c: i for i, c in enumerate(clips)}, {t: j for j, t in enumerate(tasks)}
    for clip, task in pairs:
        diff[row[clip], col[task]] = int(mine[(clip, task)]) - int(theirs[(clip, task)])
    samples = np.random.default_rng(0).integers(0, len(clips), size=(resamples, len(clips)))
    out = {}
    for group, members in (groups or GROUPS).items():
        cols = [col[t] for t in members if not np.isnan(diff[:, col[t]]).all()]
        if not cols:
            continue
        d = diff[:, cols]
        point = np.nanmean(d, axis=0).mean()
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss a task: that draw is skipped
            boot = np.nanmean(d[samples], axis=1).mean(axis=1)
        boot = boot[~np.isnan(boot)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        out[group] = (100 * float(point), 100 * float(lo), 100 * float(hi))
    return out


# task groups a run may add: held-out tasks (--holdout-tasks), tasks asked in a held-out wording (--test-phrasings)
EXTRA_GROUPS = {"holdout": "held-out tasks", "reworded": "reworded tasks"}


def summarise(answers: list, model: str, holdout: tuple[str, ...] = (), reworded: tuple[str, ...] = ()) -> list[dict]:
    """One row per (method, retention): accuracy per task and group with intervals, audio kept, and how often the
    router weighted the question's own task group most (``routed_to_group``, over routed answers with profiles).
    ``holdout``: tasks no calibration or tuning question came from, also a group of their own (``holdout``);
    ``reworded``: tasks whose test questions were worded unlike calibration's (``reworded``)."""
    groups = {**GROUPS, **({"holdout": list(holdout)} if holdout else {}),
              **({"reworded": list(reworded)} if reworded else {})}
    cells: dict[tuple[str, float], dict[str, list[int]]] = collections.defaultdict(
        lambda: collections.defaultdict(lambda: [0, 0]))
    kept: dict[tuple[str, float], list[float]] = collections.defaultdict(list)
    served: dict[tuple[str, float], dict[str, collections.Counter]] = collections.defaultdict(
        lambda: collections.defaultdict(collections.Counter))
    routed: dict[tuple[str, float], list[bool]] = collections.defaultdict(list)
    as_asked: dict[tuple[str, float], list[bool]] = collections.defaultdict(list)  # served the method's semantics
    for a in answers:
        key = (a.method, a.retention)
        if a.routed_group:
            routed[key].append(a.routed_group == TASK_GROUPS[a.task])
        if a.served_semantics:
            as_asked[key].append(a.served_semantics == (_label_semantics(a.method) or "after_prompt"))
        cells[key][a.task][0] += a.correct
        cells[key][a.task][1] += 1
        if a.audio_tokens and a.kept_tokens is not None:
            kept[key].append(a.kept_tokens / a.audio_tokens)
        if a.retention == AUTO and a.served_retention is not None:
            served[key][a.task][a.served_retention] += 1
    rows = []
    for (method, retention), per_task in cells.items():
        row = {"model": model, "method": method, "retention": retention,
               "kept_fraction": round(sum(kept[(method, retention)]) / max(len(kept[(method, retention)]), 1), 4)}
        for task in TASK_GROUPS:
            acc, lo, hi = wilson(*per_task.get(task, (0, 0)))
            row.update({task: round(acc, 1), f"{task}_lo": round(lo, 1), f"{task}_hi": round(hi, 1),
                        f"{task}_n": per_task.get(task, (0, 0))[1]})
        hits = routed[(method, retention)]
        row["routed_to_group"] = round(100 * sum(hits) / len(hits), 1) if hits else None
        served_as_asked = as_asked[(method, retention)]
        if served_as_asked:  # the share of its answers served the semantics the method names
            row["semantics_served"] = round(100 * sum(served_as_asked) / len(served_as_asked), 1)
        for group, tasks in groups.items():
            acc, lo, hi = group_mean(per_task, tasks)
            row.update({group: round(acc, 2), f"{group}_lo": round(lo, 2), f"{group}_hi": round(hi, 2)})
        for task, counts in served[(method, retention)].items():  # retention auto: what each task was served
            row[f"{task}_retention"] = counts.most_common(1)[0][0]
        pruned = retention == AUTO or retention < 1.0
        if pruned:
            for group, (d, lo, hi) in paired_difference(answers, method, retention, "full", groups=groups,
                                                        base_retention=1.0).items():
                row.update({f"{group}_vs_full": round(d, 2), f"{group}_vs_full_lo": round(lo, 2),
                            f"{group}_vs_full_hi": round(hi, 2)})
        named = _named_twin(method, {m for m, _ in cells}) if retention != AUTO else None
        if named is not None and (named, retention) in cells:
            # what routing from the input costs against naming the task (the seen profile file's, same retention)
            for group, (d, lo, hi) in paired_difference(answers, method, retention, named, groups=groups).items():
                row.update({f"{group}_vs_named": round(d, 2), f"{group}_vs_named_lo": round(lo, 2),
                            f"{group}_vs_named_hi": round(hi, 2)})
        dense = _after_prompt_twin(method, {m for m, _ in cells})
        if dense is not None and (dense, retention) in cells:
            # what the prompt step's semantics changes (in_prompt, prefill) against after_prompt, same retention
            for group, (d, lo, hi) in paired_difference(answers, method, retention, dense, groups=groups).items():
                row.update({f"{group}_vs_after_prompt": round(d, 2), f"{group}_vs_after_prompt_lo": round(lo, 2),
                            f"{group}_vs_after_prompt_hi": round(hi, 2)})
        if pruned and not method.startswith("uniform"):
            # a method at an explicit probe point is compared with uniform at the same one, where it ran; at
            # retention auto, a named-task method with uniform named too (the same retentions, task by task)
            probe_point = method.partition("@")[2].partition("/")[0]
            base = f"uniform@{probe_point}" if probe_point else "uniform"
            if retention == AUTO and "[named]" in method:
                base = "uniform[named]"
            if (base, retention) not in cells:
                base = "uniform"
            semantics = _label_semantics(method)
            if semantics and (f"{base}/{semantics}", retention) in cells:  # uniform under the same semantics
                base += f"/{semantics}"
            row["baseline"] = base
            for group, (d, lo, hi) in paired_difference(answers, method, retention, base, groups=groups).items():
                row.update({f"{group}_vs_uniform": round(d, 2), f"{group}_vs_uniform_lo": round(lo, 2),
                            f"{group}_vs_uniform_hi": round(hi, 2)})
        rows.append(row)
    rows.sort(key=lambda r: (r["model"], r["retention"] == AUTO, -_number(r["retention"]), r["method"]))
    return rows


def _named_twin(method: str, ran: set[str]) -> str | None:
    """A method routed from the input (``[auto]``, ``[group]``)'s twin with the task named and the seen profile file;
    where that did not run at the method's explicit probe point, the one at the file's probe points (the served
    default named). None for other methods."""
    if "[auto]" not in method and "[group]" not in method:
        return None
    named = method.replace("[auto]", "[named]").replace("[group]", "[named]").removesuffix("/holdout")
    if named not in ran:
        spec, _, rest = named.partition("@")
        named = spec + ("/" + rest.partition("/")[2] if "/" in rest else "")
    return named


def _label_semantics(method: str) -> str | None:
    """``in_prompt`` or ``prefill`` for a method label that names one (``Method.label``), else None."""
    return next((s for s in ("in_prompt", "prefill") if f"/{s}" in method), None)


def _after_prompt_twin(method: str, ran: set[str]) -> str | None:
    """An ``in_prompt`` or ``prefill`` method's twin under ``after_prompt`` semantics, where it ran; else None."""
    semantics = _label_semantics(method)
    if semantics is None:
        return None
    twin = method.replace(f"/{semantics}", "")
    return twin if twin in ran else None


def _number(retention: float | str) -> float:
    return 0.0 if retention == AUTO else float(retention)


def _r(retention: float | str) -> str:
    return AUTO if retention == AUTO else f"{retention:.1f}"


def markdown(rows: list[dict]) -> str:
    extra = [g for g in EXTRA_GROUPS if any(g in r for r in rows)]
    head = ["model", "method", "r", "kept", *TASK_GROUPS, "semantic", "acoustic", "mean [95% CI]",
            *(f"{EXTRA_GROUPS[g]} [95% CI]" for g in extra), "routed to its group"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["method"], _r(r["retention"]), f"{r['kept_fraction']:.2f}"]
        cells += [f"{r[t]:.1f}" for t in TASK_GROUPS]
        cells += [f"{r['semantic']:.1f}", f"{r['acoustic']:.1f}",
                  f"{r['mean']:.1f} [{r['mean_lo']:.1f}, {r['mean_hi']:.1f}]"]
        for g in extra:
            cells.append(f"{r[g]:.1f} [{r[f'{g}_lo']:.1f}, {r[f'{g}_hi']:.1f}]" if g in r else "-")
        cells.append("-" if r.get("routed_to_group") is None else f"{r['routed_to_group']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired_table(rows: list[dict], versus: str, lead: tuple[list[str], Callable[[dict], list[str]]],
                  trail: tuple[list[str], Callable[[dict], list[str]]] = ([], lambda r: [])) -> str:
    """Markdown: one line per row holding ``{group}_vs_{versus}`` differences, each group's cell
    ``d [lo, hi]`` marked below / above when the whole interval is; ``lead`` and ``trail``: (column names, the row's
    cells) before and after the groups."""
    groups = ["semantic", "acoustic", "mean", *(g for g in EXTRA_GROUPS if any(f"{g}_vs_{versus}" in r for r in rows))]
    head = [*lead[0], *groups, *trail[0]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if f"mean_vs_{versus}" not in r:
            continue
        cells = lead[1](r)
        for group in groups:
            d, lo, hi = (r.get(f"{group}_vs_{versus}{k}", math.nan) for k in ("", "_lo", "_hi"))
            mark = " **below**" if hi < 0 else (" **above**" if lo > 0 else "")
            cells.append(f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]{mark}")
        lines.append("| " + " | ".join([*cells, *trail[1](r)]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def versus_uniform(rows: list[dict]) -> str:
    """Markdown: each pruned method minus uniform on the same questions, per group, paired 95% intervals (bootstrap
    over clips); a cell is marked below / above when the whole interval is (no correction for the many cells)."""
    return _paired_table(rows, "uniform", (["model", "method", "minus", "r"], lambda r: [
        r["model"], r["method"], r.get("baseline", "uniform"), _r(r["retention"])]))


def versus_after_prompt(rows: list[dict]) -> str:
    """Markdown: each ``in_prompt`` / ``prefill`` method minus the same method under ``after_prompt`` semantics, on the
    same questions, paired 95% intervals, beside the share of its answers the engine served that semantics (a request
    whose rows do not fit one step falls back to after_prompt)."""
    def served(r: dict) -> list[str]:
        share = r.get("semantics_served")
        return ["-" if share is None else f"{share:.1f}%"]

    return _paired_table(rows, "after_prompt", (["model", "method", "r"], lambda r: [
        r["model"], r["method"], _r(r["retention"])]), (["served that semantics"], served))


def versus_named(rows: list[dict]) -> str:
    """Markdown: each method routed from the input (``[auto]``, and ``[group]``: the group named) minus the same
    policy with the task named, on the same questions, paired 95% intervals, beside the share of questions its router
    put in their own group."""
    def routed(r: dict) -> list[str]:
        share = r.get("routed_to_group")
        return ["-" if share is None else f"{share:.1f}%"]

    return _paired_table(rows, "named", (["model", "method", "r"], lambda r: [
        r["model"], r["method"], _r(r["retention"])]), (["routed to its group"], routed))


def auto_retention(rows: list[dict]) -> str:
    """Markdown: methods at retention ``auto`` (the profile file's table), their audio kept and accuracy, minus full
    audio on the same questions, beside each fixed retention's row of the same method."""
    auto = [r for r in rows if r["retention"] == AUTO]
    if not auto:
        return ""
    head = ["model", "method", "r", "kept", "mean [95% CI]", "minus full [95% CI]", "retention per task"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in auto:
        same = sorted((x for x in rows if x["model"] == r["model"] and x["method"] == r["method"]
                       and x["retention"] != AUTO), key=lambda x: -x["retention"])
        for x in [r, *same]:
            d, lo, hi = (x.get(f"mean_vs_full{k}", math.nan) for k in ("", "_lo", "_hi"))
            per_task = ", ".join(f"{t} {x[f'{t}_retention']}" for t in TASK_GROUPS if f"{t}_retention" in x)
            lines.append(f"| {x['model']} | {x['method']} | {_r(x['retention'])} | {x['kept_fraction']:.2f} | "
                         f"{x['mean']:.1f} [{x['mean_lo']:.1f}, {x['mean_hi']:.1f}] | "
                         + ("-" if math.isnan(d) else f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]") + f" | {per_task or '-'} |")
    return "\n".join(lines)


def retention_tuning(meta: dict) -> str:
    """Markdown: the retention table chosen on validation clips, per model, with the accuracies it chose from."""
    if not meta.get("retention_tuning"):
        return ""
    parts = ["\n## Retention table (retention auto) chosen on validation clips\n"]
    for model, record in meta["retention_tuning"].items():
        chosen = record["chosen"]
        parts += [f"**{model}** ({record['clips']} clips, candidates {record['candidates']}, tolerance "
                  f"{record['tolerance']} points below full audio): groups {chosen['groups']}; tasks "
                  f"{chosen.get('tasks', {})}\n"]
        candidates = [str(c) for c in record["candidates"]]
        parts += ["| questions | full | " + " | ".join(f"r = {c}" for c in candidates) + " |",
                  "|---|---|" + "---|" * len(candidates)]
        parts += [f"| {key} | {acc['full']:.1f} | " + " | ".join(f"{acc[c]:.1f}" for c in candidates) + " |"
                  for key, acc in record["accuracy"].items()]
        parts.append("")
    return "\n".join(parts) + "\n"


def tuning(meta: dict) -> str:
    """Markdown: the coverage settings tuned on validation clips, per model, with the grid's accuracies."""
    if not meta.get("coverage_tuning"):
        return ""
    parts = ["\n## Coverage settings tuned on validation clips\n"]
    for model, record in meta["coverage_tuning"].items():
        chosen = ", ".join(f"{g}: {c['segments']} windows, floor {c['floor']}" for g, c in record["chosen"].items())
        point = record.get("probe_point", "prompt")
        if isinstance(point, dict):  # one per group
            point = ", ".join(f"{g}: {p}" for g, p in point.items())
        parts += [f"**{model}** ({record['clips']} clips, r = {record['retentions']}): probe point "
                  f"{point}; {chosen}\n",
                  "| probe point | segments | floor | semantic | acoustic | all |", "|---|---|---|---|---|---|"]
        parts += [f"| {p.get('probe_point', 'prompt')}{' (uniform)' if p['floor'] >= 1.0 else ''} | {p['segments']} | "
                  f"{p['floor']} | {p.get('semantic', math.nan):.1f} | {p.get('acoustic', math.nan):.1f} | "
                  f"{p['all']:.1f} |" for p in record["grid"]]
        routed = record.get("routed")
        if routed:  # auto requests: the tuned mixed probe point against the group router's choice of rows
            parts += ["", "`auto` requests (every question) at the fixed mixed probe point and at `routed`: "
                      + "; ".join(f"{p} {acc:.1f}% (routed to its group {routed['routed_to_group'][p]:.1f}%)"
                                  for p, acc in routed["accuracy"].items()) + f"; chosen: {routed['chosen']}"]
        parts.append("")
    return "\n".join(parts) + "\n"


def write(out: Path, rows: list[dict], answers: list, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    with open(out / "answers.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(answers[0])])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(a) for a in answers)
    versus = versus_uniform(rows)
    versus = (f"\n## Minus uniform on the same questions (paired 95% intervals, bootstrap over clips; each cell "
              f"is its own test, no correction for the number of cells)\n\n{versus}\n") if versus else ""
    named = versus_named(rows)
    named = (f"\n## Routed from the input minus the task named (same policy and retention; paired 95% intervals, "
             f"bootstrap over clips)\n\n{named}\n") if named else ""
    dense = versus_after_prompt(rows)
    named += (f"\n## In-prompt and prefill semantics minus after_prompt (same method and retention; paired 95% "
              f"intervals, bootstrap over clips)\n\n{dense}\n") if dense else ""
    auto = auto_retention(rows)
    auto = (f"\n## Retention auto (the profile file's table) beside each fixed retention (minus full audio: paired "
            f"95% intervals, bootstrap over clips)\n\n{auto}\n") if auto else ""
    (out / "summary.md").write_text(f"# Listening-suite accuracy vs retention\n\nCommand: `{meta['command']}`\n\n"
                                    f"Machine: {meta['machine']}\n\n{markdown(rows)}\n{versus}{named}{auto}"
                                    f"{tuning(meta)}{retention_tuning(meta)}")
    plot(out, rows)


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.5 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        full = next((r for r in mine if r["method"] == "full"), None)
        for j, group in enumerate(("semantic", "acoustic", "mean")):
            ax = axes[i][j]
            for method in sorted({r["method"] for r in mine if r["method"] != "full"}):
                pts = sorted([r for r in mine if r["method"] == method and r["retention"] != AUTO],
                             key=lambda r: r["retention"])
                if not pts:
                    continue
                if full is not None:
                    pts = pts + [full]
                xs = [r["retention"] for r in pts]
                ys = [r[group] for r in pts]
                err = [[r[group] - r[f"{group}_lo"] for r in pts], [r[f"{group}_hi"] - r[group] for r in pts]]
                style = "k-o" if method == "uniform" else "-o"
                ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=2, label=method, alpha=0.85)
            for r in (r for r in mine if r["retention"] == AUTO):  # at the audio it kept
                ax.errorbar([r["kept_fraction"]], [r[group]], yerr=[[r[group] - r[f"{group}_lo"]],
                            [r[f"{group}_hi"] - r[group]]], fmt="*", markersize=11, capsize=2,
                            label=f"{r['method']} at retention auto")
            ax.set(title=f"{model}: {group}", xlabel="retention (audio tokens kept)", ylabel="accuracy (%)")
            ax.grid(alpha=0.3)
        axes[i][2].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_retention.png", dpi=110)
    plt.close(fig)


def rerender(out: Path) -> None:
    """Rebuild a result folder's summaries from its ``answers.csv`` and ``summary.json`` (after report changes)."""
    from headrouter_vllm.benchmarks.quality.run import Answer

    meta = json.loads((out / "summary.json").read_text())
    meta.pop("rows", None)
    with open(out / "answers.csv", newline="") as f:
        answers = [Answer(r["clip"], r["task"], r["method"], r["retention"] if r["retention"] == AUTO
                          else float(r["retention"]), r["text"], r["correct"] == "True",
                          int(r["audio_tokens"]) if r["audio_tokens"] else None,
                          int(r["kept_tokens"]) if r["kept_tokens"] else None, r["model"],
                          r.get("routed_group") or None,
                          float(r["served_retention"]) if r.get("served_retention") else None,
                          r.get("served_semantics") or None)
                   for r in csv.DictReader(f)]
    models = list(dict.fromkeys(a.model for a in answers))
    holdout = tuple(meta.get("holdout_tasks", ()))
    reworded = {m: tuple(asked) for m, asked in meta.get("test_phrasings", {}).items()}
    rows = [row for m in models for row in summarise([a for a in answers if a.model == m], m, holdout,
                                                     reworded.get(m, ()))]
    write(out, rows, answers, meta)
