"""One invariant matrix over every selection policy, plus the routing pieces: debias, router, budgets, profiles."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from headrouter_vllm.config import HeadRouterConfig
from headrouter_vllm.options import RouteOptions
from headrouter_vllm.plan import compaction_moves, make_plan
from headrouter_vllm.routing.budgets import per_head_budgets
from headrouter_vllm.routing.context import routing_context
from headrouter_vllm.routing.policies import POLICIES, RouteSettings, SpanProbe, select, uniform_indices
from headrouter_vllm.routing.policies.routed import _kv_budgets
from headrouter_vllm.routing.profiles import ModelIdentity, ProfileError, ProfileSet
from headrouter_vllm.routing.router import GroupRouter, Profile, route
from headrouter_vllm.routing.tasks import GROUPS

HEADS, KV_HEADS = 8, 2


def make_probe(n: int, seed: int = 0, heads: int = HEADS, kv: int = KV_HEADS) -> SpanProbe:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(heads, n, generator=g) ** 3 / n
    return SpanProbe(scores, torch.rand(heads, n, generator=g) / n, kv, torch.randn(n, kv, 4, generator=g))


def make_profiles(heads: int = HEADS, kv: int = KV_HEADS) -> ProfileSet:
    semantic = torch.full((heads,), 0.5)
    acoustic = torch.zeros(heads)
    acoustic[:2] = 1.0
    mixed = (semantic + acoustic) / 2
    profiles = {g: Profile(p, p / p.sum()) for g, p in zip(GROUPS, (semantic, acoustic, mixed), strict=True)}
    return ProfileSet(ModelIdentity("X", 4, heads, kv, 4), 2, 0.1, profiles, None, {"karaoke": {"acoustic": 1.0}})


FOCUS = ((2, 5), (30, 48), (40, 44), (200, 400))  # overlapping, and partly or wholly past short spans


def settings_for(policy: str, **kwargs) -> RouteSettings:
    """A policy's settings; ``region`` needs its windows."""
    return RouteSettings(policy=policy, focus=FOCUS if policy == "region" else None, **kwargs)


SETTINGS = [settings_for(p) for p in POLICIES] + [
    RouteSettings(policy=p, mode="per_head", b_min_fraction=0.0, b_max_fraction=1.0) for p in ("headrouter", "oracle")]
SIZES = [(1, 1), (3, 1), (3, 3), (7, 4), (50, 1), (50, 17), (50, 35), (50, 50), (301, 90)]


@pytest.mark.parametrize("with_profiles", [False, True], ids=["no_profiles", "profiles"])
@pytest.mark.parametrize("n,keep", SIZES, ids=[f"N{n}_keep{k}" for n, k in SIZES])
@pytest.mark.parametrize("settings", SETTINGS, ids=[f"{s.policy}-{s.mode}" for s in SETTINGS])
def test_policy_invariants(settings, n, keep, with_profiles):
    probe = make_probe(n, seed=n * 31 + keep)
    profiles = make_profiles() if with_profiles else None
    sel = select(probe, keep, dataclasses.replace(settings, task="asr"), profiles)
    again = select(probe, keep, dataclasses.replace(settings, task="asr"), profiles)
    assert torch.equal(sel.kept, again.kept)  # deterministic
    if settings.mode == "shared":
        assert sel.kept.numel() == keep
        heads_kept = [sel.kept]
    else:
        heads_kept = sel.per_head
        assert len(heads_kept) == KV_HEADS and sum(h.numel() for h in heads_kept) == keep * KV_HEADS
    for kept in heads_kept:
        assert kept.dtype == torch.long
        assert torch.equal(kept, torch.unique(kept))  # sorted and unique
        assert kept.numel() == 0 or (int(kept[0]) >= 0 and int(kept[-1]) < n)
    if keep == n:
        assert all(torch.equal(h, torch.arange(n)) for h in heads_kept)


@pytest.mark.parametrize("policy", POLICIES)
def test_bad_keep_is_an_error(policy):
    with pytest.raises(ValueError):
        select(make_probe(5), 0, settings_for(policy))
    with pytest.raises(ValueError):
        select(make_probe(5), 6, settings_for(policy))


def test_region_spreads_over_the_windows_then_tops_up_outside():
    from headrouter_vllm.routing.select import select_region

    # windows [10, 20) and [40, 50): 20 tokens inside; 10 kept = every second one of them
    assert select_region(100, 10, ((10, 20), (40, 50))).tolist() == [11, 13, 15, 17, 19, 41, 43, 45, 47, 49]
    # 26 kept: the 20 inside and 6 evenly over the 80 outside
    kept = select_region(100, 26, ((10, 20), (40, 50)))
    inside = set(range(10, 20)) | set(range(40, 50))
    assert inside <= set(kept.tolist()) and kept.numel() == 26 and torch.equal(kept, torch.unique(kept))
    outside = [k for k in kept.tolist() if k not in inside]
    assert outside == [6, 30, 53, 66, 80, 93]  # the outside tokens 0-9, 20-39, 50-99, every ~13th
    # windows past the span's end are clamped; windows that miss it entirely leave uniform
    assert select_region(30, 5, ((25, 90),)).tolist() == [25, 26, 27, 28, 29]
    assert torch.equal(select_region(30, 6, ((31, 40),)), uniform_indices(30, 6))


def test_region_needs_its_windows():
    with pytest.raises(ValueError, match="focus"):
        select(make_probe(20), 5, RouteSettings(policy="region"))


def test_baselines_have_no_per_head_mode():
    with pytest.raises(ValueError, match="per-head"):
        select(make_probe(5), 2, RouteSettings(policy="fastv", mode="per_head"))


def test_uniform_is_evenly_spaced():
    assert uniform_indices(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert uniform_indices(10, 10).tolist() == list(range(10))
    gaps = uniform_indices(1000, 300).diff()
    assert int(gaps.min()) >= 3 and int(gaps.max()) <= 4


def test_random_depends_on_seed_only():
    probe = make_probe(100)
    a = select(probe, 30, RouteSettings(policy="random", seed=1)).kept
    assert torch.equal(a, select(make_probe(100, seed=9), 30, RouteSettings(policy="random", seed=1)).kept)
    assert not torch.equal(a, select(probe, 30, RouteSettings(policy="random", seed=2)).kept)


def test_similarity_drops_duplicates_first():
    values = torch.randn(12, 1, 8, generator=torch.Generator().manual_seed(0))
    values[6:] = values[:6] * 1.001  # tokens 6..11 repeat 0..5
    probe = SpanProbe(torch.ones(2, 12), torch.ones(2, 12), 1, values)
    kept = select(probe, 6, RouteSettings(policy="similarity")).kept.tolist()
    originals = {k % 6 for k in kept}
    assert len(originals) == 6  # one copy of each distinct token


def tail_biased_probe(n: int = 200, seed: int = 0) -> SpanProbe:
    """Audio that is the same all the way through, seen through attention that piles up at the span's tail."""
    g = torch.Generator().manual_seed(seed)
    trend = 1.0 + 8.0 * (torch.arange(n) / n) ** 4
    noisy = trend * (1.0 + 0.3 * torch.rand(HEADS, n, generator=g))
    return SpanProbe(noisy / noisy.sum(dim=1, keepdim=True), noisy / noisy.sum(dim=1, keepdim=True), KV_HEADS)


def tail_fraction(kept: torch.Tensor, n: int) -> float:
    return float((kept >= 3 * n // 4).float().mean())


def test_debias_spreads_the_kept_set_where_fastv_piles_at_the_tail():
    n, keep = 200, 40
    probe = tail_biased_probe(n)
    fastv = tail_fraction(select(probe, keep, RouteSettings(policy="fastv")).kept, n)
    routed = tail_fraction(select(probe, keep, RouteSettings(policy="headrouter")).kept, n)
    assert fastv > 0.9  # nearly everything from the last quarter
    assert routed < 0.45  # close to the 0.25 an unbiased choice gives


def test_router_sends_behaviour_to_the_nearest_profile():
    profiles = make_profiles()
    semantic_like = torch.full((HEADS,), 0.5) + 0.02 * torch.arange(HEADS)
    acoustic_like = torch.zeros(HEADS)
    acoustic_like[:2] = 0.9
    in_between = (semantic_like + acoustic_like) / 2
    for behaviour, group in ((semantic_like, "semantic"), (acoustic_like, "acoustic"), (in_between, "mixed")):
        alpha, weights = route(behaviour, profiles.profiles, None, tau=0.05)
        assert max(alpha, key=alpha.get) == group
        assert torch.isclose(weights.sum(), torch.tensor(1.0)) and bool((weights >= 0).all())


def test_task_prior_pulls_the_mix():
    profiles = make_profiles()
    behaviour = (profiles.profiles["semantic"].prototype + profiles.profiles["acoustic"].prototype) / 2
    auto, _ = route(behaviour, profiles.profiles, None, tau=0.1)
    asr, _ = route(behaviour, profiles.profiles, {"semantic": 0.98, "acoustic": 0.01, "mixed": 0.01}, tau=0.1)
    assert asr["semantic"] > auto["semantic"]


@pytest.mark.parametrize("weights,total,b_min,b_max", [
    ([1, 1, 1, 1], 40, 0, 100), ([5, 1, 1, 1], 40, 2, 20), ([1, 0, 0, 0], 12, 1, 9), ([0, 0], 7, 0, 7),
    ([3, 2, 1], 30, 10, 10), ([0.2, 0.7, 0.1], 1, 0, 1), ([1, 2, 3, 4, 5, 6, 7], 123, 3, 40)])
def test_budgets_sum_and_bounds(weights, total, b_min, b_max):
    budgets = per_head_budgets(torch.tensor(weights, dtype=torch.float), total, b_min, b_max)
    assert int(budgets.sum()) == total
    assert int(budgets.min()) >= b_min and int(budgets.max()) <= b_max


def test_budgets_follow_weights():
    budgets = per_head_budgets(torch.tensor([4.0, 2.0, 1.0, 1.0]), 80, 0, 80)
    assert budgets.tolist() == [40, 20, 10, 10]
    with pytest.raises(ValueError):
        per_head_budgets(torch.tensor([1.0, 1.0]), 30, 0, 10)


def test_per_head_budgets_balance_within_each_tensor_parallel_shard():
    """Two ranks of two KV heads each: every rank's heads share ``keep`` per head (each packs its own heads into the
    span's mean-budget slots); inside a rank the routed weights still decide."""
    probe = make_probe(40, seed=3, heads=8, kv=4)
    weights = torch.tensor([4.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    budgets = _kv_budgets(probe.head_scores, weights, 10, RouteSettings(mode="per_head", kv_shards=2), 4)
    assert budgets.tolist() == [16, 4, 10, 10]
    assert _kv_budgets(probe.head_scores, weights, 10, RouteSettings(mode="per_head"), 4).sum() == 40
    with pytest.raises(ValueError, match="shards"):
        _kv_budgets(probe.head_scores, weights, 10, RouteSettings(mode="per_head", kv_shards=3), 4)


def test_per_head_plans_hold_the_mean_budget():
    """Phase B: a per_head span holds shared mode's slots (the heads' kept audio packed), its cap bounds budgets."""
    shared = make_plan(RouteOptions(), HeadRouterConfig(retention=0.3), [(3, 40), (50, 21)], 90)
    per_head = make_plan(RouteOptions(), HeadRouterConfig(retention=0.3, mode="per_head", attention="torch"),
                         [(3, 40), (50, 21)], 90)
    assert per_head.mode == "per_head" and per_head.removed == shared.removed == (40 - 12) + (21 - 6)
    assert [sp.head_cap for sp in per_head.spans] == [18, 9] and [sp.head_cap for sp in shared.spans] == [None] * 2


def test_profile_file_round_trip_and_checks(tmp_path):
    profiles = make_profiles()
    path = tmp_path / "p.json"
    profiles.save(path)
    loaded = ProfileSet.load(path)
    assert loaded.model == profiles.model and loaded.tasks == {"karaoke": {"semantic": 0.0, "acoustic": 1.0,
                                                                          "mixed": 0.0}}
    assert all(torch.equal(loaded.profiles[g].weights, profiles.profiles[g].weights) for g in GROUPS)
    loaded.check_model(profiles.model, 2)
    with pytest.raises(ProfileError, match="calibrated for"):
        loaded.check_model(dataclasses.replace(profiles.model, num_heads=16), 2)
    with pytest.raises(ProfileError, match="probe layer"):
        loaded.check_model(profiles.model, 1)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(format="x"), "not a headrouter-profiles file"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["profiles"]["semantic"].update(weights=[1.0]), "must be 8 finite numbers"),
    (lambda d: d["profiles"]["acoustic"].update(weights=[0.5] * 8), "sum to 1"),
    (lambda d: d["profiles"].pop("mixed"), "missing or malformed"),
    (lambda d: d.update(tau=0), "tau must be positive"),
    (lambda d: d.update(position_prior=[[1.0, -1.0]] * 8), "position_prior"),
    (lambda d: d.update(tasks={"x": {"loud": 1.0}}), "tasks.x"),
])
def test_malformed_profile_files(mutate, message):
    data = make_profiles().to_json()
    mutate(data)
    with pytest.raises(ProfileError, match=message):
        ProfileSet.from_json(data)


def test_profile_tasks_become_valid_request_tasks(tmp_path):
    from headrouter_vllm.options import parse_route_options
    from headrouter_vllm.routing import tasks

    path = tmp_path / "p.json"
    make_profiles().save(path)
    try:
        assert routing_context(HeadRouterConfig(profiles=str(path))).profiles.task_names() == ("karaoke",)
        assert parse_route_options({"headrouter_task": "karaoke"}).task == "karaoke"
    finally:
        tasks.register_operator_tasks(())
    with pytest.raises(ValueError):
        parse_route_options({"headrouter_task": "karaoke"})


SPAN_LAYOUTS = [[(5, 1)], [(5, 20)], [(0, 10)], [(3, 4), (10, 6)], [(2, 7), (9, 3), (20, 5)]]


@pytest.mark.parametrize("spans", SPAN_LAYOUTS, ids=lambda s: str(s))
@pytest.mark.parametrize("retention", [0.3, 0.7, 1.0])
def test_compaction_never_drops_text(spans, retention):
    length = spans[-1][0] + spans[-1][1] + 6
    plan = make_plan(RouteOptions(retention=retention), HeadRouterConfig(), spans, length)
    if plan is None:
        return  # nothing removed: runs as vanilla
    kept = torch.cat([sp.start + uniform_indices(sp.length, sp.keep) for sp in plan.spans])
    computed = length + 3  # prompt plus a few generated tokens
    src, dst = compaction_moves(plan, kept, computed)
    kv = torch.arange(computed)
    kv[dst] = kv[src].clone()
    survivors = kv[:computed - plan.removed].tolist()
    audio = {p for s, n in spans for p in range(s, s + n)}
    text = [p for p in range(computed) if p not in audio]
    assert [p for p in survivors if p not in audio] == text  # every text token, in order
    assert sorted(p for p in survivors if p in audio) == kept.tolist()
    assert bool((dst < src).all())  # moves only go down


def test_coverage_spreads_over_every_window_and_leans_to_the_mass():
    from headrouter_vllm.routing.select import select_coverage

    score = torch.zeros(80)
    score[:10] = 1.0  # all the mass in the first window
    kept = select_coverage(score, 16, segments=8, floor=0.5)
    assert kept.numel() == 16 and torch.equal(kept, torch.unique(kept))
    windows = torch.bucketize(kept, torch.arange(10, 80, 10), right=True)
    assert set(windows.tolist()) == set(range(8))  # every window keeps something
    assert int((windows == 0).sum()) >= 8  # half the budget follows the mass
    # the window caps bind: 60 of 64 tokens with all the mass on 3 of them
    spiky = torch.zeros(64)
    spiky[[5, 6, 7]] = 1.0
    assert select_coverage(spiky, 60, segments=8).numel() == 60
    # no mass at all: evenly spread by length
    assert select_coverage(torch.zeros(40), 8, segments=8).tolist() == list(range(2, 40, 5))


def test_coverage_floor_one_is_exactly_uniform():
    from headrouter_vllm.routing.select import select_coverage

    score = torch.rand(301, generator=torch.Generator().manual_seed(3))
    for keep in (1, 17, 90, 301):
        assert torch.equal(select_coverage(score, keep, segments=8, floor=1.0), uniform_indices(301, keep))


@pytest.mark.parametrize("bad", [dict(segments=0), dict(segments=2.5), dict(segments=True), dict(floor=-0.1),
                                 dict(floor=1.5)], ids=["segments0", "segments_float", "segments_bool",
                                                        "floor_negative", "floor_above_1"])
def test_coverage_settings_are_checked(bad):
    from headrouter_vllm.routing.select import Coverage

    with pytest.raises(ValueError, match="coverage"):
        Coverage(**bad)


def test_coverage_mix_follows_the_routed_groups():
    from headrouter_vllm.routing.select import Coverage

    by_group = {"semantic": Coverage(16, 0.25), "acoustic": Coverage(4, 1.0), "mixed": Coverage(8, 0.5)}
    assert Coverage.mix(by_group, {"semantic": 1.0, "acoustic": 0.0, "mixed": 0.0}) == Coverage(16, 0.25)
    mixed = Coverage.mix(by_group, {"semantic": 0.25, "acoustic": 0.75, "mixed": 0.0})
    assert mixed.segments == 4 and mixed.floor == pytest.approx(0.8125)


def test_coverage_policy_reads_its_settings_from_the_profile_file(tmp_path):
    from headrouter_vllm.routing.select import Coverage

    probe = make_probe(120, seed=5)
    scores = probe.head_scores.clone()
    scores[:, :30] *= 20  # the mass sits in the first quarter
    probe = dataclasses.replace(probe, head_scores=scores)
    settings = RouteSettings(policy="coverage", task="asr")
    as_uniform = dataclasses.replace(make_profiles(), coverage={g: Coverage(8, 1.0) for g in GROUPS})
    assert torch.equal(select(probe, 40, settings, as_uniform).kept, uniform_indices(120, 40))
    by_mass = dataclasses.replace(make_profiles(), coverage={g: Coverage(8, 0.0) for g in GROUPS})
    assert not torch.equal(select(probe, 40, settings, by_mass).kept, uniform_indices(120, 40))
    # round trip through the file, and no coverage section at all stays readable (older files)
    path = tmp_path / "p.json"
    by_mass.save(path)
    assert ProfileSet.load(path).coverage == by_mass.coverage
    make_profiles().save(path)
    assert ProfileSet.load(path).coverage == {}


@pytest.mark.parametrize("coverage,match", [
    ({"semantic": {"segments": 8, "floor": 0.5}}, "every group"),
    ({g: {"segments": 8, "floor": 2.0} for g in GROUPS}, "floor"),
    ({g: {"segments": "8", "floor": 0.5} for g in GROUPS}, "segments"),
    ({g: {"segments": 8, "floor": 0.5, "window": 3} for g in GROUPS}, "must be"),
    ([1, 2], "every group"),
], ids=["missing_group", "floor_2", "segments_str", "unknown_key", "list"])
def test_malformed_coverage_section_is_a_profile_error(coverage, match):
    data = make_profiles().to_json()
    data["coverage"] = coverage
    with pytest.raises(ProfileError, match=match):
        ProfileSet.from_json(data)


def test_coverage_tuning_choice_prefers_accuracy_then_the_uniform_side():
    from headrouter_vllm.benchmarks.quality.tune import choose, parse_grid
    from headrouter_vllm.routing.select import Coverage

    grid = parse_grid([0.25, 1.0], [4, 8])
    assert grid == [Coverage(4, 0.25), Coverage(8, 0.25), Coverage(1, 1.0)]
    accuracy = {Coverage(4, 0.25): {"semantic": 80.0, "acoustic": 90.0, "all": 85.0},
                Coverage(8, 0.25): {"semantic": 82.0, "acoustic": 88.0, "all": 85.0},
                Coverage(1, 1.0): {"semantic": 70.0, "acoustic": 90.0, "all": 85.0}}
    chosen = choose(accuracy)
    assert chosen["semantic"] == Coverage(8, 0.25)
    assert chosen["acoustic"] == Coverage(1, 1.0)  # a tie goes to the larger floor
    assert chosen["mixed"] == Coverage(1, 1.0)


def test_probe_point_tuning_chooses_per_group_and_prompt_on_a_tie():
    from headrouter_vllm.benchmarks.quality.tune import UNIFORM, choose_probe_points
    from headrouter_vllm.routing.select import Coverage

    spread = Coverage(8, 0.5)
    prompt = {UNIFORM: {"semantic": 60.0, "acoustic": 90.0, "all": 80.0},
              spread: {"semantic": 70.0, "acoustic": 85.0, "all": 79.0}}
    first = {UNIFORM: {"semantic": 55.0, "acoustic": 92.0, "all": 81.0},
             spread: {"semantic": 80.0, "acoustic": 80.0, "all": 80.0}}
    points, settings = choose_probe_points({"prompt": prompt, "first_token": first})
    assert points == {"semantic": "first_token", "acoustic": "first_token", "mixed": "first_token"}
    assert settings == {"semantic": spread, "acoustic": UNIFORM, "mixed": UNIFORM}
    first[spread]["semantic"] = 70.0  # a tie with the prompt probe's best: prompt
    points, settings = choose_probe_points({"prompt": prompt, "first_token": first})
    assert points["semantic"] == "prompt" and settings["semantic"] == spread
    assert choose_probe_points({"prompt": prompt, "first_token": prompt})[0] == dict.fromkeys(GROUPS, "prompt")


def test_tuning_reuses_an_earlier_runs_validation_grid(tmp_path):
    import json

    from headrouter_vllm.benchmarks.quality.tune import UNIFORM, measured_grid
    from headrouter_vllm.routing.select import Coverage

    record = {"clips": 43, "retentions": [0.5], "grid": [
        {"probe_point": "prompt", "segments": 1, "floor": 1.0, "all": 80.0, "semantic": 50.0, "acoustic": 90.0},
        {"probe_point": "first_token", "segments": 8, "floor": 0.5, "all": 81.0, "semantic": 49.0, "acoustic": 92.0},
        {"probe_point": "prompt", "segments": 4, "floor": 0.25, "all": 70.0}]}  # not in this run's grid: left out
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"coverage_tuning": {"m": record}}))
    grid = [UNIFORM, Coverage(8, 0.5)]
    measured = measured_grid(path, "m", 43, [0.5], grid, ["prompt", "first_token"])
    assert set(measured) == {("prompt", UNIFORM), ("first_token", Coverage(8, 0.5))}  # the rest is measured anew
    assert measured[("prompt", UNIFORM)]["semantic"] == 50.0
    with pytest.raises(SystemExit, match="43 clips"):
        measured_grid(path, "m", 40, [0.5], grid, ["prompt"])
    with pytest.raises(SystemExit, match="no coverage tuning"):
        measured_grid(path, "other", 43, [0.5], grid, ["prompt"])


def test_profile_file_probe_point_is_the_engines_default(tmp_path):
    from headrouter_vllm.config import HeadRouterConfig

    path = tmp_path / "p.json"
    profiles = dataclasses.replace(make_profiles(), probe_point="first_token", tasks={})  # registers no task
    profiles.save(path)
    assert routing_context(HeadRouterConfig(profiles=str(path))).default_probe_point == "first_token"
    assert routing_context(HeadRouterConfig(profiles=str(path), probe_point="prompt")).default_probe_point == "prompt"
    assert routing_context(HeadRouterConfig()).default_probe_point == "prompt"
    # engines whose prompt-step pruning first_token would bypass keep the prompt probe
    assert routing_context(HeadRouterConfig(profiles=str(path), semantics="in_prompt")).default_probe_point == "prompt"
    per_head = HeadRouterConfig(profiles=str(path), mode="per_head", attention="torch")
    assert routing_context(per_head).default_probe_point == "prompt"
    data = profiles.to_json()
    data["probe_point"] = "last_token"
    with pytest.raises(ProfileError, match="probe_point"):
        ProfileSet.from_json(data)
    data["probe_point"] = {"semantic": "prompt", "acoustic": "first_token"}  # a group missing
    with pytest.raises(ProfileError, match="every group"):
        ProfileSet.from_json(data)


def test_profile_file_probe_point_per_group_follows_the_task(tmp_path):
    """Per group: named tasks take their group's probe point, operator tasks their largest prior's, auto the mixed
    group's; a request or the engine config naming a probe point wins."""
    path = tmp_path / "p.json"
    points = {"semantic": "prompt", "acoustic": "first_token", "mixed": "first_token"}
    tasks = {"digits": {"semantic": 0.7, "acoustic": 0.2, "mixed": 0.1},
             "beeps": {"semantic": 0.1, "acoustic": 0.8, "mixed": 0.1}}
    dataclasses.replace(make_profiles(), probe_point=points, tasks=tasks).save(path)
    config = HeadRouterConfig(profiles=str(path))
    context = routing_context(config)
    expected = {"asr": "prompt", "semantic": "prompt", "sed": "first_token", "acoustic": "first_token",
                "digits": "prompt", "beeps": "first_token", "auto": "first_token", "mixed": "first_token"}
    assert {task: context.probe_point_for(task) for task in expected} == expected
    assert context.default_probe_point == "first_token"  # default task auto
    for named in (dict(probe_point="prompt"), dict(semantics="in_prompt")):
        assert routing_context(HeadRouterConfig(profiles=str(path), **named)).probe_point_for("sed") == "prompt"
    spans, length = [(3, 40)], 60
    assert make_plan(RouteOptions(task="sed", retention=0.5), config, spans, length).probe_point == "first_token"
    assert make_plan(RouteOptions(task="asr", retention=0.5), config, spans, length).probe_point == "prompt"
    assert make_plan(RouteOptions(task="sed", retention=0.5, probe_point="prompt"), config, spans,
                     length).probe_point == "prompt"


def test_first_token_plans_probe_the_first_generated_row():
    from headrouter_vllm.plan import make_plan

    config = HeadRouterConfig(retention=0.5, semantics="in_prompt")
    prompt = make_plan(RouteOptions(), config, [(3, 40)], 60)
    first = make_plan(RouteOptions(probe_point="first_token"), config, [(3, 40)], 60)
    assert (prompt.probe_rows, prompt.semantics) == ((43, 60), "in_prompt")
    assert (first.probe_rows, first.semantics, first.removed) == ((60, 61), "after_prompt", prompt.removed)
    per_head = HeadRouterConfig(retention=0.5, mode="per_head", attention="torch")
    assert make_plan(RouteOptions(), per_head, [(3, 40)], 60).mode == "per_head"
    assert make_plan(RouteOptions(probe_point="first_token"), per_head, [(3, 40)], 60).mode == "shared"


def test_routed_plans_probe_the_prompt_rows_and_the_first_generated_row(tmp_path):
    """Probe point routed: the rows after the audio and the first token's row, selecting in the first decode step,
    after_prompt, shared on a per_head engine; a profile file whose mixed group is routed makes it auto's default."""
    config = HeadRouterConfig(retention=0.5)
    routed = make_plan(RouteOptions(probe_point="first_token"), config, [(3, 40)], 60)
    routed = dataclasses.replace(routed, probe_point="routed")  # a request's routed needs a router: see below
    assert (routed.probe_rows, routed.probe_end, routed.selects_at_first_token) == ((43, 61), 61, True)
    path = tmp_path / "p.json"
    router = GroupRouter("first_token", {"semantic": torch.zeros(HEADS), "acoustic": torch.ones(HEADS)},
                         torch.ones(HEADS))
    points = {"semantic": "prompt", "acoustic": "first_token", "mixed": "routed"}
    dataclasses.replace(make_profiles(), router=router, probe_point=points, tasks={}).save(path)
    context = routing_context(HeadRouterConfig(profiles=str(path)))
    assert {t: context.probe_point_for(t) for t in ("auto", "asr", "sed")} == {
        "auto": "routed", "asr": "prompt", "sed": "first_token"}
    plan = make_plan(RouteOptions(retention=0.5), HeadRouterConfig(profiles=str(path)), [(3, 40)], 60)
    assert (plan.probe_point, plan.probe_rows, plan.semantics) == ("routed", (43, 61), "after_prompt")
    assert RouteOptions(probe_point="routed").probe_point == "routed"  # this process's engine has a router now
    per_head = HeadRouterConfig(profiles=str(path), mode="per_head", attention="torch")
    assert routing_context(per_head).probe_point_for("auto") == "prompt"  # the file's point does not apply there
    with pytest.raises(ValueError, match="after the prompt"):
        HeadRouterConfig(probe_point="routed", semantics="in_prompt")
    routing_context(HeadRouterConfig())  # this process's engine has no router again
    with pytest.raises(ValueError, match="this engine has none"):
        RouteOptions(probe_point="routed")


def test_group_router_is_a_gaussian_kernel_per_group():
    """alpha_k = softmax(-||(s - mu_k) / sigma||^2 / 2) over the groups with a kernel; fit learns the prototypes and
    the pooled within-group spread; a scale that is small on a head makes that head decide."""
    gen = torch.Generator().manual_seed(0)
    semantic = [torch.rand(HEADS, generator=gen) * 0.1 + 0.2 for _ in range(6)]
    acoustic = [torch.rand(HEADS, generator=gen) * 0.1 + 0.3 for _ in range(5)]
    router = GroupRouter.fit(semantic + acoustic, ["semantic"] * 6 + ["acoustic"] * 5)
    assert set(router.prototypes) == {"semantic", "acoustic"}
    assert torch.allclose(router.prototypes["semantic"], torch.stack(semantic).mean(0))
    assert all(router.alpha(b)["semantic"] > 0.99 for b in semantic)
    assert all(router.alpha(b)["acoustic"] > 0.99 for b in acoustic)
    s = semantic[0]
    expected = torch.softmax(torch.stack([-(((s - router.prototypes[g]) / router.scale) ** 2).sum() / 2
                                          for g in ("semantic", "acoustic")]).double(), 0)
    alpha = router.alpha(s)
    assert [alpha["semantic"], alpha["acoustic"], alpha["mixed"]] == pytest.approx([*expected.tolist(), 0.0])
    assert router.routes("auto", "first_token") and router.routes("auto", "routed")
    assert not router.routes("auto", "prompt") and not router.routes("asr", "routed")
    with pytest.raises(ValueError, match="two samples in each of two groups"):
        GroupRouter.fit(semantic + acoustic[:1], ["semantic"] * 6 + ["acoustic"])


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["router"].update(probe_point="prompt"), "router.probe_point must be 'first_token'"),
    (lambda d: d["router"].update(scale=[0.0] * 8), "router.scale must be positive"),
    (lambda d: d["router"].update(scale=[1.0] * 3), "router.scale must be 8"),
    (lambda d: d["router"]["prototypes"].pop("acoustic"), "two or more of the groups"),
    (lambda d: d["router"]["prototypes"].update(loud=[0.0] * 8), "two or more of the groups"),
    (lambda d: d["router"].pop("scale"), "router must be"),
    (lambda d: d.update(probe_point={"semantic": "routed", "acoustic": "prompt", "mixed": "prompt"}),
     "mixed may also be 'routed'"),
    (lambda d: d.update(probe_point="routed"), "probe_point must be one of"),
    (lambda d: (d.pop("router"), d.update(probe_point={"semantic": "prompt", "acoustic": "prompt",
                                                       "mixed": "routed"})), "needs the group router"),
])
def test_malformed_router_sections(mutate, message):
    router = GroupRouter("first_token", {"semantic": torch.zeros(HEADS), "acoustic": torch.ones(HEADS)},
                         torch.ones(HEADS))
    data = dataclasses.replace(make_profiles(), router=router).to_json()
    loaded = ProfileSet.from_json(data)
    assert torch.equal(loaded.router.scale, router.scale) and set(loaded.router.prototypes) == {"semantic",
                                                                                                  "acoustic"}
    mutate(data)
    with pytest.raises(ProfileError, match=message):
        ProfileSet.from_json(data)


def test_semantics_that_need_one_step_fall_back_where_the_chunk_budget_is_too_small():
    """in_prompt needs the rows after the audio in one prefill step, prefill the prompt from the first audio token
    on; a request beyond the step budget runs after_prompt, and its plan says why."""
    from headrouter_vllm.plan import make_plan

    spans, length = [(10, 100)], 130  # 20 rows after the audio; 120 tokens from the audio on
    for semantics, fits, too_small in (("in_prompt", 20, 19), ("prefill", 120, 119)):
        config = HeadRouterConfig(semantics=semantics)
        assert make_plan(RouteOptions(retention=0.5), config, spans, length, None).semantics == semantics
        plan = make_plan(RouteOptions(retention=0.5), config, spans, length, fits)
        assert plan.semantics == semantics and plan.semantics_note is None
        plan = make_plan(RouteOptions(retention=0.5), config, spans, length, too_small)
        assert plan.semantics == "after_prompt"
        assert f"more than max_num_batched_tokens {too_small}" in plan.semantics_note
    prefill = HeadRouterConfig(semantics="prefill")
    plan = make_plan(RouteOptions(retention=0.5), prefill, spans, length, None, prompt_logprobs=True)
    assert plan.semantics == "after_prompt" and "prompt log-probabilities" in plan.semantics_note


def test_the_registry_is_the_one_list_of_policies_and_their_capabilities():
    """Policy names and what each needs come from the registry; no module outside ``routing/policies/`` compares a
    policy name with a string (so adding a policy is its module, its registry line and its tests)."""
    import ast
    from pathlib import Path

    from headrouter_vllm.routing.policies import PER_HEAD_POLICIES, REGISTRY, policy

    assert tuple(REGISTRY) == POLICIES and all(REGISTRY[name].name == name for name in POLICIES)
    assert PER_HEAD_POLICIES == tuple(n for n in POLICIES if policy(n).per_head) == ("headrouter", "oracle", "coverage")
    assert [n for n in POLICIES if policy(n).needs_values] == ["similarity"]
    assert [n for n in POLICIES if policy(n).needs_focus] == ["region"]
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        policy("nope")
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*(root / "headrouter_vllm").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]:
        if "routing/policies" in path.as_posix():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                names = {s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)}
                for side in sides:  # "... in ('headrouter', 'oracle')"
                    if isinstance(side, (ast.Tuple, ast.List, ast.Set)):
                        names |= {e.value for e in side.elts if isinstance(e, ast.Constant)}
                if names & set(POLICIES) and "policy" in ast.unparse(node):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


@pytest.mark.parametrize("n,keep", [(7, 3), (50, 17), (257, 77)])
def test_per_head_coverage_is_shared_coverage_where_the_kv_heads_agree(n, keep):
    """Per-head coverage generalises the shared policy: KV heads whose query heads see the same attention, with
    equal weights (no profiles: equal budgets), each keep exactly the shared selection."""
    g = torch.Generator().manual_seed(n)
    one_group = torch.rand(2, n, generator=g) ** 3  # two query heads per KV head
    probe = SpanProbe(one_group.repeat(3, 1), torch.rand(6, n, generator=g), num_kv_heads=3)
    shared = select(probe, keep, RouteSettings("coverage"), None)
    per_head = select(probe, keep, RouteSettings("coverage", "per_head"), None)
    assert [h.tolist() for h in per_head.per_head] == [shared.kept.tolist()] * 3
    assert per_head.kept.tolist() == shared.kept.tolist()


def test_retention_table_in_the_profile_file(tmp_path):
    """The table round-trips; a task takes its own entry, else its group's (``auto``: mixed); malformed tables and
    requests at ``auto`` on an engine without one are clear errors."""
    from headrouter_vllm.options import OptionError, parse_route_options
    from headrouter_vllm.routing.retention import RetentionTable
    from headrouter_vllm.routing.tasks import register_operator_tasks

    table = RetentionTable({"semantic": 0.3, "acoustic": 0.5, "mixed": 0.7}, {"karaoke": 0.2, "asr": 1.0}, 2.0)
    path = tmp_path / "p.json"
    dataclasses.replace(make_profiles(), retention=table).save(path)
    assert ProfileSet.load(path).retention == table
    config = HeadRouterConfig(retention="auto", profiles=str(path))
    try:
        context = routing_context(config)
        expected = {"karaoke": 0.2, "asr": 1.0, "ser": 0.3, "semantic": 0.3, "sed": 0.5, "auto": 0.7, "mixed": 0.7}
        assert {task: context.retention_for(task) for task in expected} == expected
        assert parse_route_options({"headrouter_retention": " auto "}).retention == "auto"
        spans, length = [(3, 40)], 60
        assert make_plan(RouteOptions(task="sed"), config, spans, length).kept_tokens == 20
        assert make_plan(RouteOptions(task="karaoke"), config, spans, length).retention == 0.2
        assert make_plan(RouteOptions(task="asr"), config, spans, length) is None  # its entry keeps everything
        # a number in the request wins over the engine's auto; a request's auto on a numeric engine uses the table
        assert make_plan(RouteOptions(task="sed", retention=0.25), config, spans, length).kept_tokens == 10
        numeric = HeadRouterConfig(retention=0.9, profiles=str(path))
        assert make_plan(RouteOptions(task="sed", retention="auto"), numeric, spans, length).retention == 0.5
        routing_context(HeadRouterConfig(profiles=None))  # an engine without a table: auto is refused
        with pytest.raises(OptionError, match="headrouter_retention: 'auto' picks the retention"):
            parse_route_options({"headrouter_retention": "auto"})
    finally:
        register_operator_tasks(())
    data = make_profiles().to_json()
    for bad, message in [({"groups": {"semantic": 0.3}}, "every group"),
                         ({"groups": {"semantic": 0.3, "acoustic": 0, "mixed": 1}}, "retention.groups.acoustic"),
                         ({"groups": dict.fromkeys(GROUPS, 0.5), "tasks": {"nope": 0.5}}, "does not define"),
                         ({"groups": dict.fromkeys(GROUPS, 0.5), "tolerance": -1}, "tolerance"),
                         ({"groups": dict.fromkeys(GROUPS, 0.5), "extra": 1}, "retention must be")]:
        with pytest.raises(ProfileError, match=message):
            ProfileSet.from_json({**data, "retention": bad})


def test_retention_choice_walks_down_and_stops_at_the_first_miss():
    from headrouter_vllm.routing.retention import smallest_within

    assert smallest_within({0.7: 90.0, 0.5: 89.0, 0.3: 85.0, 0.1: 80.0}, 90.0, 2.0) == 0.5
    assert smallest_within({0.7: 90.0, 0.5: 80.0, 0.3: 90.0}, 90.0, 2.0) == 0.7  # a pass below a miss is noise
    assert smallest_within({0.7: 80.0, 0.5: 90.0}, 90.0, 2.0) == 1.0  # the largest misses: keep everything
    assert smallest_within({0.5: float("nan"), 0.3: 90.0}, 90.0, 2.0) == 1.0
    assert smallest_within({0.5: 88.0}, 90.0, 2.0) == 0.5  # exactly at the tolerance passes
