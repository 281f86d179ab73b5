"""The GPU paths, inside the engine, on CPU: the two ways HeadRouter serves on a GPU, each held to the default CPU
path (CPU_ATTN + torch probe and compaction) and to vanilla vLLM, in the same test run, on the tiny audio model.

* ``shared`` mode on vLLM's own attention (the GPU default: FLASH_ATTN there). vLLM's TRITON_ATTN stands in for it:
  the same KV layout, vLLM's own impl and metadata builder, which HeadRouter does not own; its kernels run under
  the Triton interpreter, as do HeadRouter's probe and compaction kernels on its cache. The decode kernel is vLLM's
  2D one (the 3D split-softmax variant runs 16 programs per sequence and head: 3x slower interpreted, and it is
  vLLM's kernel, not ours).
* ``per_head`` mode on HeadRouter's backend (vLLM's CUSTOM slot): its head-sparse attention, probe and compaction
  kernels, interpreted (``attention: triton``) or as their torch references (``attention: torch``).

The interpreter is slow (vLLM's TRITON_ATTN: about 15 s per 16-token request on the tiny model), so the stock
engine runs one unrouted and one routed request; HeadRouter's backend runs a few cases each, mostly as one mixed
batch: unrouted, text-only, shared-mode pruning at 0.7/0.5/0.3, a policy that reads the values (similarity);
chunked prefill, first_token and fp16 run on its torch references.
"""

from __future__ import annotations

import gc
import math

import pytest

from headrouter_vllm.demo import audio_prompt
from tests.hf_reference import reference
from tests.test_engine import BLOCK, NEW_TOKENS, PHASES, QUESTIONS, cdiv, make_cases, run_engine

PROMPTS = {clip: audio_prompt(question) for clip, question in QUESTIONS.items()}

NAMES = ["short_r1.0", "text_only", "short_r0.7", "long_r0.5", "short_r0.3", "long_r0.5_similarity"]
UNROUTED = ["short_r1.0", "text_only"]
ROUTED = [n for n in NAMES if n not in UNROUTED]
# per_head engines also run coverage per KV head (each head spreads its own budget by its own routed mass)
PER_HEAD_NAMES = [*ROUTED, "long_r0.5_coverage"]
FP16_NAMES = ["short_r1.0", "long_r0.5", "short_r0.3"]
STOCK_NAMES = ["short_r1.0", "short_r0.3"]
STOCK = {"attention_backend": "TRITON_ATTN"}  # vLLM's own Triton backend, shared mode (headrouter.attention auto)
TRITON = {"attention": "triton"}
ENGINES = {  # (engine settings, cases, phases)
    "vanilla": (dict(headrouter=None), UNROUTED, PHASES),
    "cpu": (dict(headrouter={}), NAMES, ["single"]),
    # vLLM's TRITON_ATTN interpreted costs about 15 s per request here: one unrouted and one routed request, chunked
    # prefill (64-token budget: the audio split across steps, prefill chunks mixed with decodes), NaN in every
    # vacated and freed slot (Triton kernels load masked; CPU_ATTN would need a finite poison), host and device
    # buffers kept apart as on a GPU: the most GPU-like engine this machine can run
    "stock_vanilla": (dict(headrouter=None, **STOCK), STOCK_NAMES[:1], ["batch"]),
    "stock_chunked_poisoned": (dict(headrouter={}, enable_chunked_prefill=True, max_num_batched_tokens=64,
                                    poison=math.nan, device_buffers=True, **STOCK), STOCK_NAMES, ["batch"]),
    # prefill semantics on vLLM's TRITON_ATTN (the GPU's stock backends' stand-in): above the probe layer the
    # dropped audio rows are gone, the metadata rebuilt by TRITON_ATTN's own builder; chunked, NaN-poisoned
    "stock_prefill": (dict(headrouter={"semantics": "prefill", "probe_layer": 1}, enable_chunked_prefill=True,
                           max_num_batched_tokens=192, poison=math.nan, device_buffers=True, **STOCK),
                      STOCK_NAMES[1:], ["batch"]),
    # per_head: each KV head keeps its own audio, with head profiles that give the KV heads different budgets
    # (vacated and freed slots NaN-poisoned); the similarity baseline in the same batch stays shared
    "triton_per_head": (dict(headrouter={**TRITON, "mode": "per_head", "profiles": "<per-head profiles>"},
                             poison=math.nan), PER_HEAD_NAMES, ["batch"]),
    # the kernels' torch references in HeadRouter's backend: shared mode, and HeadRouter's CPU path for per_head
    "torch": (dict(headrouter={"attention": "torch"}), NAMES, ["batch"]),
    "torch_per_head": (dict(headrouter={"mode": "per_head", "profiles": "<per-head profiles>"},
                            poison=math.nan), PER_HEAD_NAMES, PHASES),  # attention auto: the references on CPU
    "torch_per_head_chunked": (dict(headrouter={"attention": "torch", "mode": "per_head",
                                                "profiles": "<per-head profiles>"},
                                    enable_chunked_prefill=True, max_num_batched_tokens=64, poison=math.nan),
                               PER_HEAD_NAMES, ["batch"]),
    # tensor parallel (2 CPU ranks, one KV head each): the ranks gather the probe's heads, select per KV head from
    # all of them, and each compacts its own head; similarity (shared) gathers the values
    "tp2_torch_per_head": (dict(headrouter={"attention": "torch", "mode": "per_head",
                                            "profiles": "<per-head profiles>"},
                                poison=math.nan, tensor_parallel_size=2), PER_HEAD_NAMES, ["batch"]),
    # the first_token probe point: probe kernel on the first decode row, kept-only attention above it, compaction
    "cpu_first_token": (dict(headrouter={"probe_point": "first_token"}), ROUTED, ["single"]),
    "torch_first_token": (dict(headrouter={"attention": "torch", "probe_point": "first_token"}), ROUTED, ["batch"]),
    "cpu_fp16": (dict(headrouter={}, dtype="float16"), FP16_NAMES, ["single"]),
    "torch_fp16": (dict(headrouter={"attention": "torch"}, dtype="float16"), FP16_NAMES, ["batch"]),
}
# fp16: different kernels round differently; logprobs of the same greedy tokens agree within this
FP16_LOGPROB_ATOL = 0.05
IMPLS = {"stock": {"TritonAttentionImpl"}, "triton": {"HeadRouterAttentionImpl"}, "torch": {"HeadRouterAttentionImpl"},
         "tp2": None}  # tensor parallel: the runners live in the worker processes


@pytest.fixture(scope="module", autouse=True)
def two_d_stock_decode():
    """vLLM's TRITON_ATTN, interpreted, decodes with its 2D kernel (see the module docstring)."""
    from headrouter_vllm.patch.attention_backend import load_triton_attn

    load_triton_attn()
    from vllm.v1.attention.backends import triton_attn

    builder = triton_attn.TritonAttentionMetadataBuilder
    original = builder.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.seq_threshold_3D = 0  # batches of more sequences than this run the 2D kernel

    builder.__init__ = init
    yield
    builder.__init__ = original


def skewed_profiles(model_dir: str):
    """Profiles whose head weights favour KV head 0 (query heads 0, 1) for every group: unequal per-head budgets."""
    import torch
    from transformers import AutoConfig

    from headrouter_vllm.routing.profiles import ModelIdentity, Profile, ProfileSet

    identity = ModelIdentity.of(AutoConfig.from_pretrained(model_dir))
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    prototypes = {"semantic": torch.tensor([1.0, 0.5, 0.2, 0.1]), "acoustic": torch.tensor([0.1, 0.2, 0.5, 1.0]),
                  "mixed": torch.full((4,), 0.5)}
    profiles = {g: Profile(proto, weights) for g, proto in prototypes.items()}
    return ProfileSet(identity, 2, 0.1, profiles, None, {})


@pytest.fixture(scope="module")
def profiles_file(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "per-head.json"
    skewed_profiles(tiny_model).save(path)
    return str(path)


@pytest.fixture(scope="module")
def engine(tiny_model, speech, profiles_file):
    all_cases = make_cases(speech, PROMPTS)
    cache = {}

    def get(name):
        if name not in cache:
            settings, names, phases = ENGINES[name]
            if settings["headrouter"] and settings["headrouter"].get("profiles"):
                settings = {**settings, "headrouter": {**settings["headrouter"], "profiles": profiles_file}}
            cache[name] = run_engine(tiny_model, [c for c in all_cases if c.name in names], phases=phases,
                                     **settings)
        return cache[name]

    return get


def max_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("mode", [m for m in ENGINES if m.startswith(("stock", "triton", "torch"))])
def test_the_selected_backend_serves_every_layer(engine, mode):
    impls = IMPLS[mode.split("_")[0]]
    assert impls is None or engine(mode)["attention_impls"] == impls
    assert engine("cpu")["attention_impls"] == {"CPUAttentionBackendImpl"}


@pytest.mark.parametrize(("mode", "baseline", "name"), [("stock_chunked_poisoned", "stock_vanilla", "short_r1.0"),
                                                        *[("torch", "vanilla", n) for n in UNROUTED]])
def test_unrouted_requests_equal_vanilla(engine, name, mode, baseline):
    """fp32: retention 1.0 and text-only requests give vanilla vLLM's greedy tokens on the same backend (and
    CPU_ATTN's logprobs within 1e-4)."""
    ours, vanilla = engine(mode)["batch"][name], engine(baseline)["batch"][name]
    assert ours["tokens"] == vanilla["tokens"]
    assert ours["log"] is None and ours["record"] is None
    assert max_difference(ours["logprobs"], vanilla["logprobs"]) < 1e-4
    assert max_difference(ours["logprobs"], engine("vanilla")["batch"][name]["logprobs"]) < 1e-4


@pytest.mark.parametrize(("mode", "name"), [("stock_chunked_poisoned", "short_r0.3"),
                                           *[("torch", n) for n in ROUTED]])
def test_routed_requests_equal_cpu_path(engine, mode, name):
    """fp32: the same kept audio tokens (probe kernel), the same freed blocks and the same greedy tokens as the CPU
    path (compaction kernel, attention on the shortened sequences), in a mixed batch."""
    ours, cpu = engine(mode)["batch"][name], engine("cpu")["single"][name]
    assert ours["log"] is not None and ours["log"].kept == cpu["log"].kept
    assert ours["record"].blocks_after == cpu["record"].blocks_after
    assert ours["tokens"] == cpu["tokens"]
    assert max_difference(ours["logprobs"], cpu["logprobs"]) < 1e-4


def test_prefill_semantics_on_the_stock_backend_equal_hf_reference(engine, tiny_model, speech):
    """prefill on vLLM's TRITON_ATTN: the kept set, the tokens and the log-probabilities of the HF reference with the
    dropped audio gone above the probe layer, the dropped rows really not computed, and the freed blocks."""
    case = next(c for c in make_cases(speech, PROMPTS) if c.name == "short_r0.3")
    result = engine("stock_prefill")
    got = result["batch"][case.name]
    ref = reference(tiny_model, case.prompt, case.wave, case.retention, NEW_TOKENS, probe_layer=1,
                    semantics="prefill", policy=case.policy, task=case.task or "auto")
    assert result["attention_impls"] == {"TritonAttentionImpl"}
    assert got["log"].kept == ref["kept"] and got["tokens"] == ref["tokens"]
    assert max_difference(got["logprobs"], ref["logprobs"]) < 1e-3
    assert result["prefill_rows_dropped"] == ref["audio_tokens"] - len(ref["kept"])
    assert got["record"].blocks_after == cdiv(ref["length"] - (ref["audio_tokens"] - len(ref["kept"])), BLOCK)


def test_the_most_gpu_like_engine_kept_host_and_device_apart(engine):
    assert engine("stock_chunked_poisoned")["aliased_buffers"] == 0


@pytest.mark.parametrize("mode", ["torch_first_token"])
@pytest.mark.parametrize("name", ROUTED)
def test_first_token_probe_equals_cpu_path(engine, mode, name):
    ours, cpu = engine(mode)["batch"][name], engine("cpu_first_token")["single"][name]
    assert ours["log"] is not None and ours["log"].kept == cpu["log"].kept
    assert ours["record"].blocks_after == cpu["record"].blocks_after
    assert ours["tokens"] == cpu["tokens"]
    assert max_difference(ours["logprobs"], cpu["logprobs"]) < 1e-4


@pytest.fixture(scope="module")
def hf_per_head(tiny_model, speech):
    cases = {c.name: c for c in make_cases(speech, PROMPTS)}
    cache = {}

    def get(name, kv_shards=1):
        if (name, kv_shards) not in cache:
            c = cases[name]
            cache[name, kv_shards] = reference(tiny_model, c.prompt, c.wave, c.retention, NEW_TOKENS, mode="per_head",
                                               profiles=skewed_profiles(tiny_model), policy=c.policy,
                                               task=c.task or "auto", kv_shards=kv_shards)
        return cache[name, kv_shards]

    return get


PER_HEAD = [n for n in PER_HEAD_NAMES if "similarity" not in n]


@pytest.mark.parametrize(("mode", "phase"), [("triton_per_head", "batch"), ("torch_per_head", "single"),
                                             ("torch_per_head", "batch"), ("torch_per_head_chunked", "batch"),
                                             ("tp2_torch_per_head", "batch")])
@pytest.mark.parametrize("name", PER_HEAD)
def test_per_head_equals_hf_reference(engine, hf_per_head, mode, name, phase):
    """per_head mode: every KV head keeps the HF reference's audio tokens for that head (budgets proportional to
    the routed weights, capped at 1.5x the mean), the request holds only the mean budget's slots (the heads' kept
    audio packed one after another, phase B: the blocks of shared mode at the same retention), and decoding with
    each head reading its own packed cells (unused cells and freed slots NaN) gives the reference's tokens: HF with
    the full cache and a per-head mask of the dropped audio. Two tensor parallel ranks (one KV head each) pack their
    own heads, so each head keeps the mean budget, still its own tokens."""
    tensor_parallel = mode.startswith("tp2")
    got, ref = engine(mode)[phase][name], hf_per_head(name, kv_shards=2 if tensor_parallel else 1)
    assert got["log"].kept_per_head == ref["kept_per_head"]
    budgets = {len(k) for k in ref["kept_per_head"]}
    if tensor_parallel:
        assert len(budgets) == 1 and len(set(map(tuple, ref["kept_per_head"]))) > 1
    else:
        assert len(budgets) > 1, "the profiles should give the KV heads different budgets"
        assert max(budgets) > ref["keep"], "a head should keep more than the span's slots (spill into the next)"
    n, length, keep = ref["audio_tokens"], ref["length"], ref["keep"]
    assert got["record"].blocks_after == cdiv(length - (n - keep), BLOCK)
    assert got["tokens"] == ref["tokens"]
    assert max_difference(got["logprobs"], ref["logprobs"]) < 2e-3


def test_tensor_parallel_similarity_gathers_values(engine):
    """similarity (shared, reads V at the probe layer) on two ranks: the single-rank CPU path's kept set and tokens."""
    got, cpu = engine("tp2_torch_per_head")["batch"]["long_r0.5_similarity"], engine("cpu")["single"]
    assert got["log"].kept == cpu["long_r0.5_similarity"]["log"].kept
    assert got["tokens"] == cpu["long_r0.5_similarity"]["tokens"]


def test_per_head_differs_from_shared_and_leaves_baselines_shared(engine):
    per_head, shared = engine("triton_per_head")["batch"], engine("cpu")["single"]
    assert any(per_head[n]["log"].kept != shared[n]["log"].kept for n in PER_HEAD if n in shared)
    baseline = per_head["long_r0.5_similarity"]
    assert baseline["log"].kept_per_head is None
    assert baseline["tokens"] == shared["long_r0.5_similarity"]["tokens"]


@pytest.mark.parametrize("name", FP16_NAMES)
def test_fp16_follows_the_cpu_path(engine, name):
    """fp16: greedy tokens as the CPU path's, logprobs within a tolerance. The kept sets are compared in fp32
    above: in fp16 two audio tokens' scores can tie at the top-K boundary."""
    ours, cpu = engine("torch_fp16")["batch"][name], engine("cpu_fp16")["single"][name]
    assert ours["tokens"] == cpu["tokens"]
    assert max_difference(ours["logprobs"], cpu["logprobs"]) < FP16_LOGPROB_ATOL


@pytest.mark.parametrize("mode", list(ENGINES))
def test_block_pool_returns_to_start(engine, mode):
    result = engine(mode)
    assert result["free_at_end"] == result["free_at_start"]


def test_a_finished_per_head_request_leaves_no_region_behind(tiny_model, speech, profiles_file):
    """A per_head request finishes while another one runs on; a request that then takes its old batch row must not
    inherit its region layout (the backend reads each row's layout from the runner's persistent buffers)."""
    from vllm import LLM, SamplingParams

    from headrouter_vllm.options import route_args

    llm = LLM(model=tiny_model, dtype="float32", max_model_len=1024, block_size=BLOCK, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"audio": 1},
              additional_config={"headrouter": {"retention": 1.0, "attention": "torch", "mode": "per_head",
                                                "profiles": profiles_file}})
    engine = llm.llm_engine

    def audio(clip):
        return {"prompt": PROMPTS[clip], "multi_modal_data": {"audio": (speech[clip], 16000)}}

    def greedy(tokens, retention=None):
        return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                              extra_args=None if retention is None else route_args(retention=retention))

    alone = list(llm.generate(audio("long"), greedy(12), use_tqdm=False)[0].outputs[0].token_ids)
    finished = {}

    def run_until(done):
        while not done():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id.split("-")[0]] = list(out.outputs[0].token_ids)

    engine.add_request("stayer", audio("short"), greedy(60))  # batch row 0
    engine.add_request("pruned", audio("long"), greedy(4, retention=0.3))  # row 1, per_head
    run_until(lambda: "pruned" in finished)
    engine.step()  # the stayer alone
    engine.add_request("joiner", audio("long"), greedy(12))  # takes row 1 again; not routed
    run_until(lambda: not engine.has_unfinished_requests())
    assert finished["joiner"] == alone
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def omni(tiny_models, speech):
    """The Qwen2.5-Omni thinker (M-RoPE, a GQA group of 4) on HeadRouter's backend with the kernels' torch
    references: chunked prefill, NaN-poisoned vacated and freed slots, one mixed batch."""
    model = tiny_models("qwen2.5-omni")
    prompts = {clip: audio_prompt(question, "qwen2.5-omni") for clip, question in QUESTIONS.items()}
    cases = {c.name: c for c in make_cases(speech, prompts) if c.name in NAMES}
    result = run_engine(model, list(cases.values()), phases=["batch"], headrouter={"attention": "torch"},
                        poison=math.nan, enable_chunked_prefill=True, max_num_batched_tokens=64)
    return model, cases, result


@pytest.mark.parametrize("name", NAMES)
def test_omni_on_headrouters_backend_equals_hf_reference(omni, name):
    model, cases, result = omni
    case, got = cases[name], result["batch"][name]
    ref = reference(model, case.prompt, case.wave, 1.0 if case.retention is None else case.retention, NEW_TOKENS,
                    policy=case.policy, task=case.task or "auto")
    assert result["attention_impls"] == {"HeadRouterAttentionImpl"}
    assert got["tokens"] == ref["tokens"]
    if name in ROUTED:
        assert got["log"].kept == ref["kept"]
        removed = ref["audio_tokens"] - len(ref["kept"])
        assert got["record"].blocks_after == cdiv(ref["length"] - removed, BLOCK)
    else:
        assert got["log"] is None
