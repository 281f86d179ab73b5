"""Routing maths and the route plan: pure functions, checked against plain loops."""

from __future__ import annotations

import math

import pytest
import torch

from headrouter_vllm.config import HeadRouterConfig
from headrouter_vllm.kernels.probe_scores import probe_scores
from headrouter_vllm.options import RouteOptions
from headrouter_vllm.plan import keep_count, make_plan
from headrouter_vllm.routing import select_shared


def naive_probe_scores(q, k, pos, cols, scale):
    hq, hkv = q.shape[1], k.shape[1]
    out = torch.zeros(hq, len(cols), dtype=torch.float64)
    for h in range(hq):
        kh = k[:, h // (hq // hkv)].double()
        for r in range(q.shape[0]):
            logits = [float(q[r, h].double() @ kh[t]) * scale if t <= pos[r] else -math.inf
                      for t in range(k.shape[0])]
            m = max(logits)
            w = [math.exp(x - m) for x in logits]
            z = sum(w)
            for c, col in enumerate(cols.tolist()):
                out[h, c] += w[col] / z
    return out


@pytest.mark.parametrize("hq,hkv,rows,keys", [(4, 2, 3, 17), (2, 2, 1, 5), (8, 1, 5, 33), (3, 3, 2, 2)],
                         ids=lambda v: str(v))
def test_probe_scores_match_a_plain_loop(hq, hkv, rows, keys):
    g = torch.Generator().manual_seed(hq * 100 + keys)
    q, k = torch.randn(rows, hq, 8, generator=g), torch.randn(keys, hkv, 8, generator=g)
    pos = torch.arange(keys - rows, keys)
    cols = torch.arange(0, keys, 2)
    got = probe_scores(q, k, pos, cols, 8 ** -0.5)
    torch.testing.assert_close(got.double(), naive_probe_scores(q, k, pos, cols, 8 ** -0.5), rtol=1e-5, atol=1e-6)


def test_probe_scores_are_causal():
    q, k = torch.randn(2, 2, 4), torch.randn(6, 2, 4)
    got = probe_scores(q, k, torch.tensor([2, 5]), torch.arange(6), 0.5)
    # columns 3..5 are only visible to the second row, whose probabilities sum to 1
    assert torch.allclose(got.sum(dim=1), torch.full((2,), 2.0))
    only_second = probe_scores(q[1:], k, torch.tensor([5]), torch.arange(3, 6), 0.5)
    torch.testing.assert_close(got[:, 3:], only_second)


def test_select_shared_keeps_the_top_k_sorted():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0], [0.3, 0.1, 0.2, 0.1, 0.4]])
    kept, margin = select_shared(scores, 2)  # mean: .2 .3 .2 .5 .2
    assert kept.tolist() == [1, 3] and margin == pytest.approx(0.1)
    kept, margin = select_shared(scores, 5)
    assert kept.tolist() == [0, 1, 2, 3, 4] and margin is None
    kept, _ = select_shared(scores, 1, head_weights=torch.tensor([0.0, 1.0]))
    assert kept.tolist() == [4]
    with pytest.raises(ValueError):
        select_shared(scores, 0)


@pytest.mark.parametrize("r,n,k", [(0.5, 5, 3), (0.7, 78, 55), (0.5, 78, 39), (0.3, 158, 47), (0.01, 10, 1),
                                   (1.0, 10, 10), (0.999, 10, 10), (0.25, 2, 1)])
def test_keep_count_rounds_half_up(r, n, k):
    assert keep_count(r, n) == k


CONFIG = HeadRouterConfig(retention=0.5)


def test_plan_for_one_span():
    plan = make_plan(RouteOptions(), CONFIG, [(27, 78)], 124)
    assert (plan.audio_tokens, plan.kept_tokens, plan.removed, plan.probe_start) == (78, 39, 39, 105)
    assert plan.task == "auto" and plan.retention == 0.5


def test_plan_request_options_override_config():
    plan = make_plan(RouteOptions(task="asr", retention=0.3), CONFIG, [(27, 78)], 124)
    assert (plan.task, plan.kept_tokens) == ("asr", 23)


def test_plan_with_several_spans_budgets_each():
    plan = make_plan(RouteOptions(), CONFIG, [(10, 20), (40, 7)], 60)
    assert [(s.start, s.length, s.keep) for s in plan.spans] == [(10, 20, 10), (40, 7, 4)]
    assert plan.removed == 13 and plan.probe_start == 47


@pytest.mark.parametrize("options,spans,length", [
    (RouteOptions(), [], 50),  # no audio
    (RouteOptions(retention=1.0), [(5, 20)], 50),  # retention 1.0
    (RouteOptions(retention=0.99), [(5, 20)], 50),  # keeps every token anyway
    (RouteOptions(), [(5, 20)], 25),  # nothing after the audio to probe with
])
def test_no_plan_means_vanilla(options, spans, length):
    assert make_plan(options, CONFIG, spans, length) is None
