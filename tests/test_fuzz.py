"""Property-based tests (hypothesis) of the request schema and the routing functions."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headrouter_vllm.api.middleware import RequestError, rewrite_body
from headrouter_vllm.options import OPTION_KEYS, OptionError, parse_route_options
from headrouter_vllm.routing.budgets import per_head_budgets
from headrouter_vllm.routing.policies import POLICIES, RouteSettings, SpanProbe, select

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)
option_values = st.one_of(json_values, st.sampled_from(["asr", "auto", "0.5", "1", "0", "uniform", "fastv", " 0.3"]))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*OPTION_KEYS, "other"]), option_values, max_size=4))
def test_options_parse_or_name_the_field(extra):
    try:
        options = parse_route_options(extra)
    except OptionError as e:
        assert e.param in OPTION_KEYS
        return
    assert options.retention is None or 0 < options.retention <= 1


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "metadata": st.one_of(json_values, st.dictionaries(st.sampled_from([*OPTION_KEYS, "user"]), option_values)),
    "vllm_xargs": st.one_of(json_values, st.dictionaries(st.sampled_from([*OPTION_KEYS, "x"]), option_values)),
    "messages": json_values})))
def test_any_body_is_rewritten_or_refused_with_a_field(body):
    try:
        out = rewrite_body(body)
    except RequestError as e:
        assert e.param and str(e).startswith(e.param)
        return
    if isinstance(out, dict) and out is not body:
        parse_route_options(out["vllm_xargs"])  # what reaches vLLM is valid


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), data=st.data(), policy=st.sampled_from(POLICIES), seed=st.integers(0, 2**31))
def test_any_probe_gives_a_valid_selection(n, data, policy, seed):
    keep = data.draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(seed)
    probe = SpanProbe(torch.rand(4, n, generator=gen), torch.rand(4, n, generator=gen), 2,
                      torch.randn(n, 2, 3, generator=gen))
    window = st.tuples(st.integers(0, 70), st.integers(1, 30)).map(lambda w: (w[0], w[0] + w[1]))
    focus = tuple(data.draw(st.lists(window, min_size=1, max_size=4))) if policy == "region" else None
    kept = select(probe, keep, RouteSettings(policy=policy, seed=seed, focus=focus)).kept
    assert kept.numel() == keep and torch.equal(kept, torch.unique(kept)) and int(kept.max()) < n


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=8), st.data())
def test_budgets_always_sum_and_respect_bounds(weights, data):
    g = len(weights)
    b_min = data.draw(st.integers(0, 5))
    b_max = data.draw(st.integers(b_min, b_min + 20))
    total = data.draw(st.integers(g * b_min, g * b_max))
    budgets = per_head_budgets(torch.tensor(weights), total, b_min, b_max)
    assert int(budgets.sum()) == total and int(budgets.min()) >= b_min and int(budgets.max()) <= b_max
