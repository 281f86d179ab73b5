"""Calibration through the engine's own probe, and serving with the profile file it writes."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import soundfile as sf

from headrouter_vllm.demo import audio_prompt
from tests.hf_reference import reference

QUESTION = "What is said in this audio clip?"


def tone(seconds: float, freq: float, noise: float, seed: int) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, speech):
    folder = tmp_path_factory.mktemp("calibration")
    lines = []
    clips = [("speech_short.wav", speech["short"], "asr", None), ("speech_long.wav", speech["long"], "ser", None),
             ("tone.wav", tone(3.0, 440, 0.05, 0), "scene", None), ("noise.wav", tone(2.5, 90, 0.3, 1), "sed", None),
             ("beeps.wav", tone(2.0, 1000, 0.1, 2), "beep_count", "acoustic")]
    for name, wave, task, group in clips:
        sf.write(folder / name, wave, 16000)
        lines.append(json.dumps({"audio": name, "task": task, "question": QUESTION, **({"group": group} if group
                                                                                        else {})}))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def profile_file(tiny_model, manifest, tmp_path_factory):
    from headrouter_vllm.calibrate import calibrate

    out = tmp_path_factory.mktemp("profiles") / "profiles.json"
    calibrate(tiny_model, manifest, out, dtype="float32")
    gc.collect()
    return out


def test_calibration_writes_a_valid_deterministic_file(tiny_model, manifest, profile_file, tmp_path):
    from headrouter_vllm.calibrate import calibrate
    from headrouter_vllm.routing.profiles import ProfileSet

    profiles = ProfileSet.load(profile_file)
    assert (profiles.model.num_heads, profiles.model.num_kv_heads, profiles.probe_layer) == (4, 2, 2)
    assert set(profiles.tasks) == {"asr", "ser", "scene", "sed", "beep_count"}
    assert profiles.tasks["beep_count"]["acoustic"] > 0.5 and profiles.tasks["asr"]["semantic"] > 0.5
    assert profiles.position_prior.shape == (4, 16)
    again = tmp_path / "again.json"
    calibrate(tiny_model, manifest, again, dtype="float32")
    gc.collect()
    first, second = json.loads(profile_file.read_text()), json.loads(again.read_text())
    first["calibration"].pop("manifest"), second["calibration"].pop("manifest")
    assert first == second


@pytest.mark.parametrize("line,message", [
    ('{"audio": "missing.wav", "task": "asr"}', "does not exist"),
    ('{"audio": "tone.wav", "task": "karaoke"}', "needs a 'group'"),
    ('{"task": "asr"}', "audio"),
    ("not json", "Expecting value"),
])
def test_bad_manifests(manifest, tmp_path, line, message):
    from headrouter_vllm.calibrate import read_manifest

    bad = manifest.parent / "bad.jsonl"
    bad.write_text(manifest.read_text() + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_manifest(bad)


def test_manifest_needs_both_groups(manifest):
    from headrouter_vllm.calibrate import read_manifest

    only_speech = manifest.parent / "speech.jsonl"
    only_speech.write_text("\n".join(x for x in manifest.read_text().splitlines() if "speech" in x) + "\n")
    with pytest.raises(ValueError, match="acoustic"):
        read_manifest(only_speech)


def test_engine_routes_with_the_profiles_like_the_reference(tiny_model, profile_file, speech):
    """With a profile file, the engine's kept sets and tokens equal the offline reference's, for a named task,
    an operator-added task and auto."""
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.options import route_args
    from headrouter_vllm.routing.profiles import ProfileSet
    from headrouter_vllm.routing.tasks import register_operator_tasks

    profiles = ProfileSet.load(profile_file)
    llm = LLM(model=tiny_model, dtype="float32", max_model_len=1024, block_size=32, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"audio": 1},
              additional_config={"headrouter": {"retention": 0.5, "profiles": str(profile_file)}})
    try:
        runner = inprocess.model_runner(llm)
        for task in ("asr", "beep_count", "auto"):
            out = llm.generate({"prompt": audio_prompt(QUESTION), "multi_modal_data": {"audio": (speech["long"],
                                                                                                  16000)}},
                               SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                              extra_args=route_args(task=task)), use_tqdm=False)[0]
            ref = reference(tiny_model, audio_prompt(QUESTION), speech["long"], 0.5, 12, task=task, profiles=profiles)
            log = runner.hr_log[-1]
            assert log.kept == ref["kept"] and list(out.outputs[0].token_ids) == ref["tokens"]
            assert log.alpha[0] == pytest.approx(ref["alpha"], rel=1e-4)
            assert sum(log.alpha[0].values()) == pytest.approx(1)
    finally:
        register_operator_tasks(())
        del llm
        gc.collect()


def test_profile_for_another_model_stops_startup(tiny_model, profile_file, tmp_path):
    from vllm import LLM

    data = json.loads(profile_file.read_text())
    data["model"]["num_layers"] = 28
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(Exception, match="calibrated for"):
        LLM(model=tiny_model, dtype="float32", max_model_len=1024, enforce_eager=True,
            additional_config={"headrouter": {"profiles": str(other)}})


def test_retention_auto_serves_the_tables_retention_per_task(tiny_model, profile_file, speech, tmp_path):
    """An engine at retention ``auto`` serves each request its task's entry of the profile file's retention table
    (else its group's; ``auto`` the mixed group's), says so in the usage report, and answers exactly as a request
    that names that retention; a request's own ``auto`` resolves the same way, an entry of 1.0 runs unpruned."""
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.names import REPORT_KEY
    from headrouter_vllm.options import route_args
    from headrouter_vllm.routing.tasks import register_operator_tasks

    data = json.loads(profile_file.read_text())
    data["retention"] = {"groups": {"semantic": 0.3, "acoustic": 0.5, "mixed": 0.7}, "tasks": {"beep_count": 0.2,
                                                                                           "sed": 1.0}}
    path = tmp_path / "with-table.json"
    path.write_text(json.dumps(data))
    llm = LLM(model=tiny_model, dtype="float32", max_model_len=1024, block_size=32, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"audio": 1},
              additional_config={"headrouter": {"retention": "auto", "profiles": str(path)}})
    prompt = {"prompt": audio_prompt(QUESTION), "multi_modal_data": {"audio": (speech["long"], 16000)}}
    try:
        runner = inprocess.model_runner(llm)
        expected = {"asr": 0.3, "scene": 0.5, "beep_count": 0.2, "auto": 0.7, "semantic": 0.3, "sed": 1.0}
        for task, retention in expected.items():
            outs = llm.generate([prompt] * 3, [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                              extra_args=route_args(task=task, retention=r))
                                               for r in (None, "auto", retention)], use_tqdm=False)
            reports = [out.kv_transfer_params[REPORT_KEY] for out in outs]
            assert [r["retention"] for r in reports] == [retention] * 3, task
            assert len({tuple(out.outputs[0].token_ids) for out in outs}) == 1, task
            kept = {r["kept_audio_tokens"] for r in reports}
            assert kept == ({reports[0]["audio_tokens"]} if retention == 1.0 else
                            {round(retention * reports[0]["audio_tokens"])}), task
        assert runner.hr_log  # the pruned ones were routed
    finally:
        register_operator_tasks(())
        del llm
        gc.collect()


def test_retention_auto_without_a_table_is_refused(tiny_model, profile_file):
    """The engine's ``auto`` without a table stops startup; a request's ``auto`` on such an engine is a clear
    request error, before it runs."""
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    from headrouter_vllm.options import route_args
    from headrouter_vllm.routing.tasks import register_operator_tasks

    with pytest.raises(Exception, match="retention 'auto'.*has none"):
        LLM(model=tiny_model, dtype="float32", max_model_len=1024, enforce_eager=True,
            additional_config={"headrouter": {"retention": "auto", "profiles": str(profile_file)}})
    with pytest.raises(Exception, match="no profile file is set"):
        LLM(model=tiny_model, dtype="float32", max_model_len=1024, enforce_eager=True,
            additional_config={"headrouter": {"retention": "auto"}})
    llm = LLM(model=tiny_model, dtype="float32", max_model_len=1024, enforce_eager=True,
              additional_config={"headrouter": {"retention": 0.5, "profiles": str(profile_file)}})
    try:
        with pytest.raises(VLLMValidationError, match="headrouter_retention: 'auto' picks .* retention table"):
            SamplingParams(extra_args={"headrouter_retention": "auto"})
        with pytest.raises(ValueError, match="retention table"):
            route_args(retention="auto")
    finally:
        register_operator_tasks(())
        del llm
        gc.collect()


def test_calibration_fits_the_group_router(profile_file):
    """Calibration probes every sample at the first token's row too: the file has a Gaussian kernel per group with
    samples of its own (none for mixed), and each sample's row routes it to its own group."""
    from headrouter_vllm.routing.profiles import ProfileSet

    profiles = ProfileSet.load(profile_file)
    router = profiles.router
    assert router is not None and router.probe_point == "first_token"
    assert set(router.prototypes) == {"semantic", "acoustic"}
    assert router.scale.shape == (4,) and bool((router.scale > 0).all())
    assert router.alpha(router.prototypes["semantic"])["semantic"] > 0.5
    assert router.alpha(router.prototypes["acoustic"])["acoustic"] > 0.5
    assert router.alpha(router.prototypes["acoustic"])["mixed"] == 0.0


@pytest.fixture(scope="module")
def routed_file(profile_file, tmp_path_factory):
    """The calibrated file with one probe point per group: semantic prompt, acoustic first_token, mixed routed."""
    data = json.loads(profile_file.read_text())
    data["probe_point"] = {"semantic": "prompt", "acoustic": "first_token", "mixed": "routed"}
    path = tmp_path_factory.mktemp("routed") / "routed.json"
    path.write_text(json.dumps(data))
    return path


def test_routed_probe_point_equals_the_reference(tiny_model, routed_file, speech):
    """Probe point ``routed``: the engine keeps the prompt rows' mass and the first token's row apart, the group
    router reads the row, and the routed group's probe point picks the scores; kept sets, routing mix and tokens
    equal the HF reference's (which takes both rows from output_attentions), for both clips, with the probe point
    from the file (task auto) and named; the group router also routes ``auto`` at ``first_token``. Named tasks
    keep their prior, and their group's rows."""
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.options import route_args
    from headrouter_vllm.routing.profiles import ProfileSet
    from headrouter_vllm.routing.tasks import register_operator_tasks

    profiles = ProfileSet.load(routed_file)
    llm = LLM(model=tiny_model, dtype="float32", max_model_len=1024, block_size=32, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"audio": 1}, enable_chunked_prefill=True, max_num_batched_tokens=64,
              additional_config={"headrouter": {"retention": 0.3, "profiles": str(routed_file)}})
    cases = [("auto", None, "routed"), ("auto", "routed", "routed"), ("auto", "first_token", "first_token"),
             ("asr", "routed", "routed"), ("scene", "routed", "routed")]
    groups, kept = set(), {}
    try:
        runner = inprocess.model_runner(llm)
        for clip in ("short", "long"):
            for task, point, resolved in cases:
                out = llm.generate({"prompt": audio_prompt(QUESTION), "multi_modal_data": {"audio": (speech[clip],
                                                                                                      16000)}},
                                   SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                  extra_args=route_args(task=task, probe_point=point)),
                                   use_tqdm=False)[0]
                ref = reference(tiny_model, audio_prompt(QUESTION), speech[clip], 0.3, 8, task=task,
                                profiles=profiles, probe_point=resolved)
                log = runner.hr_log[-1]
                kept[(clip, task, point)] = log.kept
                assert log.kept == ref["kept"], (clip, task, point)
                assert list(out.outputs[0].token_ids) == ref["tokens"], (clip, task, point)
                assert log.alpha[0] == pytest.approx(ref["alpha"], rel=1e-3, abs=1e-6)
                if task == "auto":
                    assert log.alpha[0]["mixed"] == 0.0  # the group router: no kernel for mixed
                    groups.add(max(log.alpha[0], key=log.alpha[0].get))
        assert groups  # the cases route somewhere (the tiny model's random heads decide where)
        # the rows matter: routed to semantic, the prompt rows keep other tokens than the first token's row
        assert any(kept[(clip, "auto", "routed")] != kept[(clip, "auto", "first_token")] for clip in ("short", "long"))
    finally:
        register_operator_tasks(())
        del llm
        gc.collect()


def test_routed_probe_point_needs_a_router(tiny_model, profile_file, tmp_path):
    """Without a group router, ``routed`` is refused: in the profile file, the engine config and per request."""
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    from headrouter_vllm.routing.tasks import register_operator_tasks

    data = json.loads(profile_file.read_text())
    data.pop("router")
    no_router = tmp_path / "no-router.json"
    no_router.write_text(json.dumps(data))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "probe_point": {"semantic": "prompt", "acoustic": "first_token",
                                                       "mixed": "routed"}}))
    with pytest.raises(Exception, match="mixed 'routed' needs the group router"):
        LLM(model=tiny_model, dtype="float32", max_model_len=1024, enforce_eager=True,
            additional_config={"headrouter": {"profiles": str(bad)}})
    with pytest.raises(Exception, match="probe_point 'routed'.*has no router"):
        LLM(model=tiny_model, dtype="float32", max_model_len=1024, enforce_eager=True,
            additional_config={"headrouter": {"probe_point": "routed", "profiles": str(no_router)}})
    llm = LLM(model=tiny_model, dtype="float32", max_model_len=1024, enforce_eager=True,
              additional_config={"headrouter": {"retention": 0.5, "profiles": str(no_router)}})
    try:
        with pytest.raises(VLLMValidationError, match="headrouter_probe_point: 'routed' .* has none"):
            SamplingParams(extra_args={"headrouter_probe_point": "routed"})
    finally:
        register_operator_tasks(())
        del llm
        gc.collect()
