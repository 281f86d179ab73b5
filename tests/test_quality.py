"""The quality benchmark's bookkeeping: method list, intervals and summaries (the engine runs are in
tests/test_listening.py and the benchmark itself)."""

from __future__ import annotations

import math

import pytest

from headrouter_vllm.benchmarks.quality import report
from headrouter_vllm.benchmarks.quality.run import Answer, Method, methods


def test_method_grid_and_labels():
    grid = methods([0.7, 0.3], ["headrouter:named", "headrouter:auto", "oracle", "uniform"], ["headrouter:named"])
    assert grid[0].label == "full" and grid[0].retention == 1.0
    assert len(grid) == 1 + 2 * (4 + 1)
    labels = {m.label for m in grid if m.retention == 0.7}
    assert labels == {"headrouter[named]", "headrouter[auto]", "oracle[named]", "uniform",
                      "headrouter[named]/in_prompt"}
    assert Method("uniform", 0.5, "in_prompt").label == "uniform/in_prompt"
    per_head = methods([0.5], ["uniform"], [], ["headrouter:named"])
    assert [(m.label, m.engine) for m in per_head[1:]] == [
        ("uniform", ("after_prompt", "shared", "seen")),
        ("headrouter[named]/per_head", ("after_prompt", "per_head", "seen"))]
    with pytest.raises(ValueError, match="baselines stay shared"):
        methods([0.5], [], [], ["uniform"])
    # held-out tasks: the methods that run with the profile file calibrated without them, on an engine of their own
    held = methods([0.3], ["coverage:named"], [], [], ["coverage:auto", "coverage:group"])
    assert [(m.label, m.engine[2]) for m in held[1:]] == [
        ("coverage[named]", "seen"), ("coverage[auto]/holdout", "holdout"), ("coverage[group]/holdout", "holdout")]
    with pytest.raises(ValueError, match="the task after ':' is one of named, group, auto"):
        methods([0.3], ["coverage:asr"], [])


def test_router_group_and_held_out_tasks_in_the_summary():
    from headrouter_vllm.benchmarks.quality.run import heaviest_group

    assert heaviest_group([{"semantic": 0.2, "acoustic": 0.7, "mixed": 0.1}]) == "acoustic"
    assert heaviest_group(None) is None and heaviest_group([None]) is None
    answers = [Answer("c1", "digits", "coverage[auto]", 0.3, "", True, 100, 30, routed_group="semantic"),
               Answer("c1", "beeps", "coverage[auto]", 0.3, "", False, 100, 30, routed_group="semantic"),
               Answer("c2", "beeps", "coverage[auto]", 0.3, "", True, 100, 30, routed_group="acoustic"),
               Answer("c2", "event", "coverage[auto]", 0.3, "", True, 100, 30, routed_group="mixed")]
    (row,) = report.summarise(answers, "m", holdout=("beeps",))
    assert row["routed_to_group"] == 50.0  # digits -> semantic and beeps -> acoustic of four
    assert row["holdout"] == 50.0 and row["beeps_n"] == 2
    table = report.markdown([row])
    assert "held-out tasks" in table and "50.0%" in table
    (plain,) = report.summarise(answers, "m")
    assert "holdout" not in plain and "held-out" not in report.markdown([plain])


def test_wilson_interval():
    acc, lo, hi = report.wilson(45, 50)
    assert acc == 90.0 and 78 < lo < 79 and 95 < hi < 96  # textbook values 78.6, 95.7
    assert abs(report.wilson(0, 10)[1]) < 1e-9 and abs(report.wilson(10, 10)[2] - 100.0) < 1e-9
    assert all(math.isnan(x) for x in report.wilson(0, 0))


def test_summary_per_task_and_group():
    answers = [Answer("c1", "digits", "uniform", 0.5, "digits 1 2", True, 100, 50),
               Answer("c2", "digits", "uniform", 0.5, "digits 1", False, 80, 40),
               Answer("c1", "beeps", "uniform", 0.5, "beeps 2", True, 100, 50)]
    (row,) = report.summarise(answers, "m")
    assert row["digits"] == 50.0 and row["digits_n"] == 2 and row["beeps"] == 100.0 and row["beeps_n"] == 1
    assert row["semantic"] == 50.0 and row["acoustic"] == 100.0 and row["mean"] == 75.0
    assert row["kept_fraction"] == 0.5
    assert row["mean_lo"] < 75.0 < row["mean_hi"]
    assert "| m | uniform | 0.5 |" in report.markdown([row])


def test_paired_difference_against_uniform(tmp_path):
    def answer(clip, task, method, correct):
        served = "prefill" if method.endswith("/prefill") and clip != "c0" else "after_prompt"  # c0 fell back
        return Answer(clip, task, method, 0.3, "", correct, 100, 30, model="m", served_semantics=served)

    answers = []
    for i in range(40):  # digits: coverage right on every question, uniform on half of them
        answers += [answer(f"c{i}", "digits", "coverage", True), answer(f"c{i}", "digits", "uniform", i % 2 == 0)]
        answers += [answer(f"c{i}", "beeps", "coverage", i % 4 != 0), answer(f"c{i}", "beeps", "uniform", True)]
    answers.append(answer("only-coverage", "digits", "coverage", False))  # unpaired: ignored
    diff = report.paired_difference(answers, "coverage", 0.3)
    assert diff["semantic"][0] == pytest.approx(50.0) and diff["semantic"][1] > 0  # above, beyond the interval
    assert diff["acoustic"][0] == pytest.approx(-25.0) and diff["acoustic"][2] < 0  # below, beyond the interval
    assert diff["mean"][0] == pytest.approx(12.5)
    assert report.paired_difference(answers, "coverage", 0.5) == {}
    rows = report.summarise(answers, "m")
    table = report.versus_uniform(rows)
    assert "| m | coverage | uniform | 0.3 | +50.0" in table and "**above**" in table and "**below**" in table
    # rows with and without the paired columns go into one CSV; a folder re-renders from its answers
    out = tmp_path / "run"
    meta = {"command": "quality", "machine": {}, "coverage_tuning": {"m": {
        "clips": 3, "retentions": [0.3], "probe_point": "first_token",
        "chosen": {g: {"segments": 8, "floor": 0.5} for g in ("semantic", "acoustic", "mixed")},
        "grid": [{"probe_point": "prompt", "segments": 1, "floor": 1.0, "semantic": 50.0, "acoustic": 90.0,
                  "all": 80.0}]}}}
    report.write(out, rows, answers, meta)
    first = (out / "summary.md").read_text()
    assert "Minus uniform" in first and "probe point first_token" in first
    report.rerender(out)
    assert (out / "summary.md").read_text() == first


def test_retention_auto_methods_rows_and_tables(tmp_path):
    """Methods at retention auto come last, once; their rows give the audio kept, the retention each task was served,
    accuracy minus full audio and minus uniform at the same retentions (uniform[named] for named tasks); the folder
    re-renders from its answers."""
    grid = methods([0.5], ["coverage:named"], [], [], [], ["coverage:named", "uniform:named", "uniform"])
    assert [(m.label, m.retention) for m in grid] == [("full", 1.0), ("coverage[named]", 0.5),
                                                      ("coverage[named]", "auto"), ("uniform[named]", "auto"),
                                                      ("uniform", "auto")]
    assert all(m.routed for m in grid[1:]) and not grid[0].routed
    answers = []
    for i in range(30):
        for task, served in (("digits", 0.3), ("beeps", 0.5)):
            answers += [Answer(f"c{i}", task, "full", 1.0, "", True, 100, 100, "m"),
                        Answer(f"c{i}", task, "coverage[named]", 0.5, "", i % 3 != 0, 100, 50, "m"),
                        Answer(f"c{i}", task, "coverage[named]", "auto", "", i % 5 != 0, 100, int(served * 100), "m",
                               served_retention=served),
                        Answer(f"c{i}", task, "uniform[named]", "auto", "", i % 2 == 0, 100, int(served * 100), "m",
                               served_retention=served)]
    rows = report.summarise(answers, "m")
    assert [(r["method"], r["retention"]) for r in rows] == [
        ("full", 1.0), ("coverage[named]", 0.5), ("coverage[named]", "auto"), ("uniform[named]", "auto")]
    auto = rows[2]
    assert auto["kept_fraction"] == 0.4 and (auto["digits_retention"], auto["beeps_retention"]) == (0.3, 0.5)
    assert auto["mean_vs_full"] == pytest.approx(-20.0) and auto["baseline"] == "uniform[named]"
    assert auto["mean_vs_uniform"] == pytest.approx(30.0)
    assert rows[1]["mean_vs_full"] == pytest.approx(-100 / 3, abs=0.01)
    assert "| m | coverage[named] | auto | 0.40 |" in report.markdown(rows)
    table = report.auto_retention(rows)
    assert "| m | coverage[named] | auto | 0.40 | 80.0" in table and "digits 0.3, beeps 0.5" in table
    assert "| m | coverage[named] | 0.5 | 0.50 |" in table
    out = tmp_path / "run"
    meta = {"command": "quality", "machine": {}, "retention_tuning": {"m": {
        "clips": 30, "candidates": [0.5, 0.3], "tolerance": 2.0,
        "chosen": {"groups": {"semantic": 0.3, "acoustic": 0.5, "mixed": 0.5}, "tasks": {"digits": 0.3}},
        "accuracy": {"semantic": {"full": 90.0, "0.5": 90.0, "0.3": 89.0}}}}}
    report.write(out, rows, answers, meta)
    first = (out / "summary.md").read_text()
    assert "Retention auto" in first and "| semantic | 90.0 | 90.0 | 89.0 |" in first
    report.rerender(out)
    assert (out / "summary.md").read_text() == first


def test_tuning_table_reports_the_routed_choice():
    """The coverage tuning section names, per model, auto's accuracy at the fixed mixed probe point and at routed,
    the router's group accuracy at each, and the choice."""
    record = {"clips": 48, "retentions": [0.5, 0.3], "chosen": {g: {"segments": 8, "floor": 0.5}
                                                               for g in ("semantic", "acoustic", "mixed")},
              "probe_point": {"semantic": "prompt", "acoustic": "first_token", "mixed": "routed"},
              "grid": [{"probe_point": "prompt", "segments": 8, "floor": 0.5, "all": 80.0, "semantic": 70.0,
                        "acoustic": 85.0}],
              "routed": {"accuracy": {"first_token": 80.5, "routed": 82.25},
                         "routed_to_group": {"first_token": 95.1, "routed": 95.1}, "chosen": "routed"}}
    text = report.tuning({"coverage_tuning": {"m": record}})
    assert "mixed: routed" in text
    assert "first_token 80.5% (routed to its group 95.1%); routed 82.2% (routed to its group 95.1%); chosen: routed" \
        in text


def test_routed_from_the_input_minus_the_task_named():
    """``[auto]`` and ``[group]`` methods get a paired difference against the same policy with the task named, at
    their retention; the table gives it with the share of questions routed to their own group."""
    def answer(clip, task, method, correct, group):
        return Answer(clip, task, method, 0.3, "", correct, 100, 30, model="m", routed_group=group)

    answers = []
    for i in range(40):  # digits: named always right, auto right on half (and routed to semantic on half)
        answers += [answer(f"c{i}", "digits", "coverage[named]", True, "semantic"),
                    answer(f"c{i}", "digits", "coverage[auto]@routed", i % 2 == 0,
                           "semantic" if i % 2 == 0 else "acoustic"),
                    answer(f"c{i}", "beeps", "coverage[named]", True, "acoustic"),
                    answer(f"c{i}", "beeps", "coverage[auto]@routed", True, "acoustic")]
    rows = {r["method"]: r for r in report.summarise(answers, "m")}
    auto = rows["coverage[auto]@routed"]
    assert auto["semantic_vs_named"] == pytest.approx(-50.0) and auto["semantic_vs_named_hi"] < 0
    assert auto["acoustic_vs_named"] == 0.0 and auto["routed_to_group"] == 75.0
    assert "semantic_vs_named" not in rows["coverage[named]"]
    table = report.versus_named(list(rows.values()))
    assert "| m | coverage[auto]@routed | 0.3 | -50.0" in table and "**below**" in table and "75.0%" in table
    # tasks asked in a held-out wording (--test-phrasings) form a group of their own in every table
    rows = report.summarise(answers, "m", reworded=("digits",))
    assert next(r for r in rows if r["method"] == "coverage[auto]@routed")["reworded_vs_named"] == pytest.approx(-50)
    assert "reworded tasks [95% CI]" in report.markdown(rows) and "| reworded |" in report.versus_named(rows)


def test_prefill_methods_and_their_after_prompt_twin():
    """``--prefill-policies``: methods on an engine of their own, labelled ``/prefill``; each gets a paired difference
    against the same method under after_prompt semantics, in its own table."""
    grid = methods([0.3], ["coverage:named@prompt"], [], prefill_policies=["coverage:named@prompt"])
    assert [(m.label, m.engine) for m in grid[1:]] == [
        ("coverage[named]@prompt", ("after_prompt", "shared", "seen")),
        ("coverage[named]@prompt/prefill", ("prefill", "shared", "seen"))]

    def answer(clip, task, method, correct):
        served = "prefill" if method.endswith("/prefill") and clip != "c0" else "after_prompt"  # c0 fell back
        return Answer(clip, task, method, 0.3, "", correct, 100, 30, model="m", served_semantics=served)

    answers = []
    for i in range(40):  # beeps: prefill wrong on a quarter of the clips
        answers += [answer(f"c{i}", "beeps", "coverage[named]@prompt", True),
                    answer(f"c{i}", "beeps", "coverage[named]@prompt/prefill", i % 4 != 0),
                    answer(f"c{i}", "digits", "coverage[named]@prompt", True),
                    answer(f"c{i}", "digits", "coverage[named]@prompt/prefill", True)]
    rows = {r["method"]: r for r in report.summarise(answers, "m")}
    prefill = rows["coverage[named]@prompt/prefill"]
    assert prefill["acoustic_vs_after_prompt"] < 0 and prefill["semantic_vs_after_prompt"] == 0.0
    assert "mean_vs_after_prompt" not in rows["coverage[named]@prompt"]
    assert prefill["baseline"] == "uniform"  # no uniform/prefill ran
    both = answers + [answer(f"c{i}", t, m, True) for i in range(40) for t in ("beeps", "digits")
                      for m in ("uniform", "uniform/prefill")]
    assert {r["method"]: r for r in report.summarise(both, "m")}[prefill["method"]]["baseline"] == "uniform/prefill"
    assert prefill["semantics_served"] == 97.5 and rows["coverage[named]@prompt"]["semantics_served"] == 100.0
    table = report.versus_after_prompt(list(rows.values()))
    assert "| m | coverage[named]@prompt/prefill | 0.3 |" in table and "| 97.5% |" in table
    with pytest.raises(ValueError, match="prompt probe point only"):
        methods([0.3], [], [], prefill_policies=["coverage:named@first_token"])
    with pytest.raises(ValueError, match="prompt probe point only"):
        methods([0.3], [], ["coverage:named@routed"])
