"""Per-request options: the pydantic validation and the metadata → vllm_xargs rewrite."""

from __future__ import annotations

import pytest

from headrouter_vllm.api.middleware import RequestError, rewrite_body
from headrouter_vllm.options import OptionError, parse_route_options, route_args


@pytest.mark.parametrize("extra,task,retention", [
    (None, None, None),
    ({}, None, None),
    ({"other": 1}, None, None),
    ({"headrouter_task": "asr"}, "asr", None),
    ({"headrouter_retention": "0.5"}, None, 0.5),
    ({"headrouter_retention": 1}, None, 1.0),
    ({"headrouter_retention": " 0.25 "}, None, 0.25),
    ({"headrouter_task": "auto", "headrouter_retention": 0.7}, "auto", 0.7),
])
def test_good_options(extra, task, retention):
    options = parse_route_options(extra)
    assert (options.task, options.retention) == (task, retention)


@pytest.mark.parametrize("extra,field", [
    ({"headrouter_task": "karaoke"}, "headrouter_task"),
    ({"headrouter_task": 3}, "headrouter_task"),
    ({"headrouter_probe_point": "last_token"}, "headrouter_probe_point"),
    ({"headrouter_probe_point": 1}, "headrouter_probe_point"),
    ({"headrouter_retention": 0}, "headrouter_retention"),
    ({"headrouter_retention": "0"}, "headrouter_retention"),
    ({"headrouter_retention": 1.5}, "headrouter_retention"),
    ({"headrouter_retention": -1}, "headrouter_retention"),
    ({"headrouter_retention": "abc"}, "headrouter_retention"),
    ({"headrouter_retention": [0.5]}, "headrouter_retention"),
    ({"headrouter_retention": True}, "headrouter_retention"),
    ({"headrouter_retention": "nan"}, "headrouter_retention"),
    ({"headrouter_retention": "inf"}, "headrouter_retention"),
    ({"headrouter_policy": "region"}, "headrouter_focus"),  # region keeps what the request names: it must name it
    ({"headrouter_focus": "1-2"}, "headrouter_focus"),  # focus without policy region
    ({"headrouter_policy": "uniform", "headrouter_focus": "1-2"}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": "1"}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": "2-1"}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": "1-1"}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": "a-b"}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": "1-nan"}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": ""}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": []}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": [[1, 2, 3]]}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": [[-1, 2]]}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": [[False, 2]]}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": [[0, 1]] * 65}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": {"a": 1}}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": [1, 2, 3]}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": ["1-2", 3]}, "headrouter_focus"),
    ({"headrouter_policy": "region", "headrouter_focus": 5}, "headrouter_focus"),
], ids=lambda v: str(v)[:40])
def test_bad_options_name_the_field(extra, field):
    with pytest.raises(OptionError) as info:
        parse_route_options(extra, prefix="vllm_xargs.")
    assert info.value.param == "vllm_xargs." + field
    assert str(info.value).startswith("vllm_xargs." + field)


@pytest.mark.parametrize("focus", ["2.5-7, 12-14.5", ["2.5-7", "12-14.5"], [2.5, 7, 12, 14.5],
                                   [[2.5, 7], [12, 14.5]], [["2.5", "7"], (12, 14.5)]])
def test_focus_windows_parse_from_metadata_strings_and_lists(focus):
    options = parse_route_options({"headrouter_policy": "region", "headrouter_focus": focus})
    assert options.focus == ((2.5, 7.0), (12.0, 14.5))
    # the offline API sends the string form, which metadata and vllm_xargs take too
    args = route_args(policy="region", focus=focus)
    assert args["headrouter_focus"] == "2.5-7.0,12.0-14.5" and parse_route_options(args) == options


def test_focus_seconds_become_every_overlapping_token():
    from headrouter_vllm.plan import focus_tokens

    assert focus_tokens(((0.5, 1.0), (2.01, 2.05)), 25.0) == ((12, 25), (50, 52))
    assert focus_tokens(((0.8, 4.4),), 25.0) == ((20, 110),)  # 4.4 x 25 = 110.00000000000001 in floating point
    assert focus_tokens(None, 25.0) is None


def test_route_args():
    assert route_args(task="asr", retention=0.5) == {"headrouter_task": "asr", "headrouter_retention": 0.5}
    assert route_args() == {}
    with pytest.raises(ValueError):
        route_args(retention=2)


REMOTE_AUDIO = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}]}]


def test_metadata_moves_into_vllm_xargs():
    body = {"model": "m", "metadata": {"headrouter_task": "asr", "headrouter_retention": "0.5", "user": "x"},
            "vllm_xargs": {"other": 1}, "messages": REMOTE_AUDIO}
    out = rewrite_body(body)
    assert out["vllm_xargs"] == {"other": 1, "headrouter_task": "asr", "headrouter_retention": 0.5}
    assert out["metadata"] == body["metadata"] and body["vllm_xargs"] == {"other": 1}  # input not mutated


@pytest.mark.parametrize("body", [{"model": "m"}, {"metadata": {"user": "x"}}, {"metadata": None}, [1, 2], "s"])
def test_bodies_without_options_pass_unchanged(body):
    assert rewrite_body(body) is body


def test_retention_without_audio_passes():
    """A retention alone (e.g. a client-wide default) on a text-only request is harmless: served as vanilla."""
    out = rewrite_body({"metadata": {"headrouter_retention": "0.5"}, "messages": [{"role": "user", "content": "hi"}]})
    assert out["vllm_xargs"] == {"headrouter_retention": 0.5}


def test_region_and_its_focus_may_come_from_either_place():
    body = {"metadata": {"headrouter_policy": "region"}, "vllm_xargs": {"headrouter_focus": [1, 2.5]},
            "messages": REMOTE_AUDIO}
    out = rewrite_body(body)
    assert out["vllm_xargs"] == {"headrouter_policy": "region", "headrouter_focus": [1, 2.5]}
    assert parse_route_options(out["vllm_xargs"]).focus == ((1.0, 2.5),)


def test_same_value_in_both_places_is_fine():
    out = rewrite_body({"metadata": {"headrouter_retention": "0.5"}, "vllm_xargs": {"headrouter_retention": "0.5"}})
    assert out["vllm_xargs"] == {"headrouter_retention": 0.5}


@pytest.mark.parametrize("body,param", [
    ({"metadata": "asr"}, "metadata"),
    ({"metadata": [1]}, "metadata"),
    ({"vllm_xargs": "x"}, "vllm_xargs"),
    ({"metadata": {"headrouter_retention": 0.5}}, "metadata.headrouter_retention"),
    ({"metadata": {"headrouter_task": ["asr"]}}, "metadata.headrouter_task"),
    ({"metadata": {"headrouter_retention": "0.5"}, "vllm_xargs": {"headrouter_retention": 0.7}},
     "metadata.headrouter_retention"),
    ({"metadata": {"headrouter_task": "karaoke"}}, "metadata.headrouter_task"),
    ({"metadata": {"headrouter_probe_point": "middle"}}, "metadata.headrouter_probe_point"),
    ({"vllm_xargs": {"headrouter_retention": 2}}, "vllm_xargs.headrouter_retention"),
    # a task on a request without audio
    ({"metadata": {"headrouter_task": "asr"}}, "metadata.headrouter_task"),
    ({"vllm_xargs": {"headrouter_task": "asr"}, "messages": [{"role": "user", "content": "hi"}]},
     "vllm_xargs.headrouter_task"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": 7}}]}]},
     "messages[0].content[0].input_audio.format"),
    # region and its focus: each needs the other, in either place; a focus needs audio
    ({"metadata": {"headrouter_policy": "region"}, "messages": REMOTE_AUDIO}, "metadata.headrouter_focus"),
    ({"vllm_xargs": {"headrouter_focus": "1-2"}, "messages": REMOTE_AUDIO}, "vllm_xargs.headrouter_focus"),
    ({"metadata": {"headrouter_policy": "region", "headrouter_focus": "1-2"}}, "metadata.headrouter_focus"),
    ({"metadata": {"headrouter_policy": "region", "headrouter_focus": "2-1"}, "messages": REMOTE_AUDIO},
     "metadata.headrouter_focus"),
], ids=lambda v: str(v)[:50])
def test_bad_bodies(body, param):
    with pytest.raises(RequestError) as info:
        rewrite_body(body)
    assert info.value.param == param and str(info.value).startswith(param)


def _audio_body(data: str, kind: str = "input_audio") -> dict:
    part = ({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}} if kind == "input_audio"
            else {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{data}"}})
    return {"messages": [{"role": "system", "content": "hi"}, {"role": "user", "content": [{"type": "text",
                                                                                              "text": "q"}, part]}]}


def _wav_b64(seconds: float) -> str:
    import base64

    import numpy as np

    from headrouter_vllm.audio import to_wav_bytes

    return base64.b64encode(to_wav_bytes(np.zeros(int(16000 * seconds), dtype=np.float32))).decode()


@pytest.fixture
def thirty_second_model():
    from headrouter_vllm.api import limits

    limits.set_max_audio_seconds(30.0)
    yield
    limits.set_max_audio_seconds(None)


@pytest.mark.parametrize("kind", ["input_audio", "audio_url"])
def test_audio_within_the_limit_passes(thirty_second_model, kind):
    body = _audio_body(_wav_b64(29.9), kind)
    assert rewrite_body(body) is body


@pytest.mark.parametrize("kind", ["input_audio", "audio_url"])
@pytest.mark.parametrize("data,message", [
    (None, "longer"),  # filled in below: 31 s of audio
    ("", "non-empty base64"),
    ("!!!not-base64!!!", "not valid base64"),
    ("Z2FyYmFnZWdhcmJhZ2VnYXJiYWdl", "could not decode"),
    ("UklGRiQAAABXQVZFZm10IBAAAAABAAEAgD4AAAB9AAACABAAZGF0YQAAAAA=", "empty"),  # a valid WAV with no samples
], ids=["too_long", "empty_string", "bad_base64", "corrupt", "no_samples"])
def test_bad_audio_is_refused(thirty_second_model, kind, data, message):
    body = _audio_body(_wav_b64(31.0) if data is None else data, kind)
    with pytest.raises(RequestError) as info:
        rewrite_body(body)
    assert info.value.param.startswith("messages[1].content[1]")
    if message == "longer":
        assert "31.0 s long" in str(info.value) and "at most 30 s" in str(info.value)
    else:
        assert message in str(info.value)


def test_metadata_retention_auto_moves_as_the_word_when_the_engine_has_a_table():
    """``"auto"`` in metadata reaches the engine as the word (it resolves per task in the plan); on an engine whose
    profile file has no retention table it is a 400 naming the field."""
    from headrouter_vllm.routing.capabilities import RETENTION_TABLE

    body = {"metadata": {"headrouter_task": "asr", "headrouter_retention": "auto"}, "messages": REMOTE_AUDIO}
    try:
        RETENTION_TABLE.set(True)
        assert rewrite_body(body)["vllm_xargs"] == {"headrouter_task": "asr", "headrouter_retention": "auto"}
        RETENTION_TABLE.set(False)
        with pytest.raises(RequestError, match="retention table") as info:
            rewrite_body(body)
        assert info.value.param == "metadata.headrouter_retention"
    finally:
        RETENTION_TABLE.set(False)
