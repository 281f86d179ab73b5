"""``headrouter-vllm bench`` end to end on a tiny workload: vanilla and HeadRouter on the same requests."""

from __future__ import annotations

import csv
import json


def test_bench_runs_vanilla_and_headrouter_side_by_side(tiny_model, tmp_path):
    from headrouter_vllm.cli import main

    args = ["bench", "--model", tiny_model, "--num-requests", "6", "--clip-seconds", "10", "20",
            "--output-tokens", "4", "6", "--retentions", "0.5", "--kv-blocks", "64", "--out", str(tmp_path),
            "--name", "t", "--export-workload", str(tmp_path / "workload"), "--admission-headroom", "8"]
    assert main(args) == 0
    (run_dir,) = [p for p in tmp_path.glob("*/t")]
    summary = json.loads((run_dir / "summary.json").read_text())
    vanilla, pruned = summary["runs"]
    assert vanilla["retention"] is None and pruned["retention"] == 0.5
    assert vanilla["requests"] == pruned["requests"] == 6
    # the same requests: 10 s and 20 s clips are 250 and 500 audio tokens; r=0.5 keeps half
    assert pruned["audio_tokens_mean"] == 375 and pruned["audio_kept_mean"] == 187.5
    assert pruned["kv_blocks_per_request"] < vanilla["kv_blocks_per_request"]
    assert pruned["ideal_gain"] > 1.5 and summary["machine"]["cores"] >= 1 and "bench" in summary["command"]
    rows = list(csv.DictReader((run_dir / "requests.csv").read_text().splitlines()))
    # clip lengths and answer lengths cycle so that every pair occurs: 10 s / 4, 20 s / 4, 10 s / 6, 20 s / 6, ...
    assert len(rows) == 12 and [int(r["output_tokens"]) for r in rows[:6]] == [4, 4, 6, 6, 4, 4]
    for run in (vanilla, pruned):  # the profile accounts for the run's time, and every request decoded
        assert run["prefill_steps"] >= 1 and run["decode_steps"] >= 1 and 1 <= run["decoding_max"] <= 6
        parts = run["input_s"] + run["prefill_s"] + run["decode_s"] + run["other_s"]
        assert abs(parts - run["duration_s"]) < 1e-6 and run["decode_step_ms"] > 0
    assert summary["workload"]["warmup_pass"] is True
    # the Amdahl bound: vanilla's non-decode time does not shrink, its decode time shrinks by the whole ceiling
    fixed = (vanilla["duration_s"] - vanilla["decode_s"]) / vanilla["duration_s"]
    assert vanilla["amdahl_gain"] == 1.0
    assert abs(pruned["amdahl_gain"] - 1 / (fixed + (1 - fixed) / pruned["ideal_gain"])) < 1e-9
    assert 1.0 < pruned["amdahl_gain"] < pruned["ideal_gain"]
    # traceable to the code that ran: this checkout's commit (the tests run from a git checkout)
    assert len(summary["source"]["git_commit"]) == 40 and isinstance(summary["source"]["git_dirty"], bool)
    # growth-aware admission with headroom for every answer (at most 6 tokens): the HeadRouter run never preempts
    assert summary["workload"]["admission_headroom"] == 8 and pruned["preemptions"] == 0
    assert (run_dir / "plots.png").stat().st_size > 10_000
    lines = (tmp_path / "workload" / "workload.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {"prompt", "audio", "output_tokens"} <= set(json.loads(lines[0]))


def test_bench_order_runs_repeated_engines_apart(tiny_model, tmp_path):
    """``--order``: exactly these engines in this order, repeats measured and labelled apart, ratios against the
    first vanilla (as shipped: not ``vanilla-window``, vanilla with Qwen2-Audio's encoder on the real audio only)."""
    from headrouter_vllm.cli import main

    args = ["bench", "--model", tiny_model, "--num-requests", "3", "--clip-seconds", "5", "--output-tokens", "3",
            "--order", "vanilla-window,vanilla,1.0,vanilla", "--kv-blocks", "64", "--out", str(tmp_path), "--name", "o",
            "--no-warmup-pass"]
    assert main(args) == 0
    (run_dir,) = [p for p in tmp_path.glob("*/o")]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["vanilla encoder window", "vanilla", "headrouter r=1",
                                                     "vanilla #2"]
    assert [r["retention"] for r in summary["runs"]] == [None, None, 1.0, None]
    assert [r["encoder_window"] for r in summary["runs"]] == [True, False, True, False]
    assert summary["runs"][1]["throughput_gain"] == 1.0
    assert summary["workload"]["order"] == ["vanilla-window", None, 1.0, None]


def test_bench_order_refuses_what_it_cannot_run():
    import argparse

    import pytest

    from headrouter_vllm.benchmarks.serving.main import engine_order

    assert engine_order("vanilla, 0.5,vanilla") == [None, 0.5, None]
    assert engine_order("vanilla-window,vanilla") == ["vanilla-window", None]
    for bad, message in (("1.0,0.5", "needs a 'vanilla' run"), ("vanilla,1.5", "not in"), ("vanilla,abc", "neither"),
                          ("vanilla-window,1.0", "needs a 'vanilla' run")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            engine_order(bad)


def test_bench_runs_an_omni_long_audio_workload(tmp_path, capsys):
    """`--model` names a local builder; 90 s clips (2,250 audio tokens, over Qwen2-Audio's 30 s) prefill in 1024-token
    chunks on the Omni thinker; the clip length is checked against the model before anything starts."""
    import pytest

    from headrouter_vllm.cli import main

    common = ["bench", "--model", "tiny-qwen2.5-omni", "--num-requests", "2", "--output-tokens", "4",
              "--retentions", "0.3", "--kv-blocks", "200", "--out", str(tmp_path), "--name", "omni", "--no-warmup-pass"]
    for extra, message in ((["--clip-seconds", "301", "--max-model-len", "6000"], "takes at most 300 s"),
                           (["--clip-seconds", "90"], "raise --max-model-len")):
        with pytest.raises(SystemExit) as stop:
            main([*common, *extra])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert main([*common, "--clip-seconds", "90", "--max-model-len", "2400", "--max-num-batched-tokens", "1024"]) == 0
    summary = json.loads(next(tmp_path.glob("*/omni/summary.json")).read_text())
    vanilla, pruned = summary["runs"]
    assert pruned["audio_tokens_mean"] == 2250 and pruned["audio_kept_mean"] == 675
    assert "tiny-qwen2.5-omni" in summary["model"]


def test_step_profile_counts_only_steps_that_ran():
    """The mean of requests past their prompt is over the time of the steps that scheduled something: a step that
    ran nothing counts in neither its numerator nor its time base."""
    from types import SimpleNamespace

    from headrouter_vllm.benchmarks.serving.run import StepProfile

    def scheduled(rows: int, tokens: int, encoder: bool = False):
        return SimpleNamespace(num_scheduled_tokens=dict.fromkeys(range(rows), 1), total_num_scheduled_tokens=tokens,
                               scheduled_encoder_inputs={0: [0]} if encoder else {})

    profile = StepProfile()
    profile.add_step(1.0, scheduled(2, 200, encoder=True), decoding=0)
    profile.add_step(0.5, scheduled(3, 3), decoding=3)
    profile.add_step(0.2, None, decoding=3)
    profile.add_step(0.3, scheduled(0, 0), decoding=3)
    profile.add_step(0.5, scheduled(3, 3), decoding=1)
    assert (profile.prefill_steps, profile.decode_steps, profile.decode_rows) == (1, 2, 6)
    assert profile.decoding_max == 3 and abs(profile.decoding_mean - (3 * 0.5 + 1 * 0.5) / 2.0) < 1e-12
    assert StepProfile().decoding_mean == 0.0


def _runs(tmp_path, name):
    (run_dir,) = [p for p in tmp_path.glob(f"*/{name}")]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = list(csv.DictReader((run_dir / "requests.csv").read_text().splitlines()))
    return summary, {run["label"]: [r for r in rows if r["run"] == run["label"]] for run in summary["runs"]}


def test_bench_multi_turn_against_vanilla_with_prefix_caching(tiny_model, tmp_path):
    """``--workload multi-turn``: each turn resends the conversation when the previous one finishes. Vanilla (prefix
    caching on, as deployed) serves a follow-up's clip and earlier turns from its cache; a routed HeadRouter request
    hits only the blocks before its audio, recomputes the clip and routes again; an unrouted one caches as vanilla."""
    from headrouter_vllm.cli import main

    args = ["bench", "--model", tiny_model, "--workload", "multi-turn", "--turns", "3", "--num-requests", "2",
            "--clip-seconds", "5", "--output-tokens", "4", "--order", "vanilla,0.5,1.0", "--kv-blocks", "64",
            "--max-model-len", "512", "--out", str(tmp_path), "--name", "mt", "--no-warmup-pass"]
    assert main(args) == 0
    summary, requests = _runs(tmp_path, "mt")
    assert summary["workload"]["workload"] == "multi-turn" and summary["workload"]["prefix_caching"] == "on"
    vanilla, routed, unrouted = summary["runs"]
    assert all(run["prefix_caching"] and run["requests"] == 6 for run in summary["runs"])
    assert vanilla["ttft_followup_p50_ms"] > 0 and routed["ttft_followup_p50_ms"] > 0
    audio = 125  # a 5 s clip
    for label, rows in requests.items():
        assert [int(r["turn"]) for r in rows] == [0, 1, 2] * 2
        for first, *later in (rows[:3], rows[3:]):
            prompts = [int(first["prompt_tokens"]), *(int(r["prompt_tokens"]) for r in later)]
            assert prompts == sorted(prompts) and len(set(prompts)) == 3  # the conversation grows each turn
            assert int(first["cached_tokens"]) < audio  # nothing before the clip fills a block but the system text
            for r in later:
                cached = int(r["cached_tokens"])
                if label == "headrouter r=0.5":  # the clip starts in the first block (of 32): no hit at all
                    assert cached == 0 and int(r["kept_tokens"]) < audio, r
                else:  # the clip and the earlier turns, up to the last whole block of the previous prompt
                    assert cached > audio and cached % 32 == 0, (label, r)
    assert routed["cached_share"] < vanilla["cached_share"] - 0.2
    assert abs(unrouted["cached_share"] - vanilla["cached_share"]) < 0.05  # the same answers up to float noise


def test_bench_shared_prompt_hits_the_system_prompt_in_every_engine(tiny_model, tmp_path, capsys):
    import pytest

    from headrouter_vllm.cli import main

    common = ["bench", "--model", tiny_model, "--num-requests", "3", "--clip-seconds", "4", "--output-tokens", "3",
              "--kv-blocks", "96", "--out", str(tmp_path), "--no-warmup-pass"]
    assert main([*common, "--workload", "shared-prompt", "--order", "vanilla,0.5", "--name", "sp"]) == 0
    assert main([*common, "--workload", "shared-prompt", "--order", "vanilla,0.5", "--name", "off",
                 "--prefix-caching", "off"]) == 0
    summary, requests = _runs(tmp_path, "sp")
    for label, rows in requests.items():  # requests after the first find the ~330-token system prompt cached
        assert [int(r["cached_tokens"]) >= 320 for r in rows] == [False, True, True], label
    assert all(run["cached_share"] > 0.3 for run in summary["runs"])
    summary, requests = _runs(tmp_path, "off")
    assert all(run["cached_share"] == 0 and not run["prefix_caching"] for run in summary["runs"])
    for extra, message in ((["--turns", "2"], "--turns is for --workload multi-turn"),
                           (["--workload", "multi-turn", "--turns", "1"], "at least 2 turns"),
                           (["--workload", "multi-turn", "--export-workload", str(tmp_path / "w")], "single"),
                           (["--workload", "multi-turn", "--turns", "9", "--clip-seconds", "30"],
                            "raise --max-model-len")):
        with pytest.raises(SystemExit) as stop:
            main([*common, "--order", "vanilla", "--name", "bad", *extra])
        assert stop.value.code == 2 and message in capsys.readouterr().err, extra


def test_bench_per_head_holds_the_mean_budget(tiny_model, tmp_path):
    """``--modes shared per_head``: the per_head engine (each KV head its own kept audio, packed at the mean budget)
    holds the KV blocks of shared mode at the same retention: its ideal and its held requests are shared mode's."""
    from headrouter_vllm.cli import main

    args = ["bench", "--model", tiny_model, "--num-requests", "4", "--clip-seconds", "10", "--output-tokens", "4",
            "--retentions", "0.5", "--modes", "shared", "per_head", "--kv-blocks", "64", "--out", str(tmp_path),
            "--name", "m", "--no-warmup-pass"]
    assert main(args) == 0
    (run_dir,) = [p for p in tmp_path.glob("*/m")]
    summary = json.loads((run_dir / "summary.json").read_text())
    vanilla, shared, per_head = summary["runs"]
    assert [r["label"] for r in summary["runs"]] == ["vanilla", "headrouter r=0.5", "headrouter r=0.5 per_head"]
    assert (shared["mode"], per_head["mode"], vanilla["mode"]) == ("shared", "per_head", None)
    # no --policy: each engine's default, recorded with the run
    assert (shared["policy"], per_head["policy"], vanilla["policy"]) == ("coverage", "headrouter", None)
    assert per_head["audio_kept_mean"] == shared["audio_kept_mean"] == 125
    assert per_head["kv_blocks_per_request"] == shared["kv_blocks_per_request"] < vanilla["kv_blocks_per_request"]
    assert per_head["ideal_gain"] == shared["ideal_gain"] and summary["workload"]["modes"] == ["shared", "per_head"]


def test_bench_per_head_refuses_what_would_run_shared(tiny_model, tmp_path, capsys):
    import pytest

    from headrouter_vllm.cli import main

    base = ["bench", "--model", tiny_model, "--num-requests", "2", "--modes", "per_head", "--out", str(tmp_path)]
    for extra, message in ((["--policy", "fastv"], "needs a per-head policy"),
                           (["--semantics", "in_prompt"], "after_prompt semantics only"),
                           (["--modes", "shared", "per_head", "--order", "vanilla,0.5"], "give --modes one value")):
        with pytest.raises(SystemExit) as stop:
            main([*base, *extra])
        assert stop.value.code == 2 and message in capsys.readouterr().err
