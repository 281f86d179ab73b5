"""``headrouter-vllm bench``: the same requests through vanilla vLLM and HeadRouter at several retentions."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from headrouter_vllm.benchmarks.serving.workload import WORKLOADS

VANILLA_WINDOW = "vanilla-window"  # --order: vanilla with Qwen2-Audio's encoder on the real audio only


def engine_order(text: str) -> list[float | str | None]:
    """``--order``: comma-separated ``vanilla``, ``vanilla-window`` (vanilla with
    ``additional_config.headrouter_encoder_window``) or retentions in (0, 1]; ``None`` stands for vanilla. The first
    vanilla is the base of every ratio, so the list must hold one."""
    order = []
    for item in (part.strip() for part in text.split(",")):
        if item in ("vanilla", VANILLA_WINDOW):
            order.append(None if item == "vanilla" else item)
            continue
        try:
            retention = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is neither 'vanilla', {VANILLA_WINDOW!r} nor a retention") \
                from None
        if not 0.0 < retention <= 1.0:
            raise argparse.ArgumentTypeError(f"retention {item} is not in (0, 1]")
        order.append(retention)
    if None not in order:
        raise argparse.ArgumentTypeError("the order needs a 'vanilla' run: every ratio is against the first one")
    return order


def _text_tokens(model: str, workload, max_output: int) -> int:
    """The most text tokens a request of the workload holds (its system prompt, questions and earlier answers, the
    chat format around them), from the model's tokenizer; answers counted at ``max_output`` tokens each."""
    from transformers import AutoTokenizer

    from headrouter_vllm.benchmarks.serving.workload import chat_prompt
    from headrouter_vllm.models import adapter_for_model_dir

    tokenizer, family = AutoTokenizer.from_pretrained(model), adapter_for_model_dir(model).family
    questions = {r.index: r.question for r in workload}
    answers = dict.fromkeys(questions, "")
    return max(len(tokenizer(chat_prompt(r, family, questions, answers)).input_ids) + max_output * (1 + len(r.history))
               for r in workload) + 16  # the audio placeholder's few tokens, counted in the audio's share


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-qwen2-audio",
                        help="a model directory, or the name of a local builder (`headrouter-vllm make-model`), "
                             "built into a temporary folder: tiny-qwen2-audio (default), tiny-qwen2.5-omni, ...")
    parser.add_argument("--load-format", default="auto", help="'dummy' for weightless real-shape configs")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workload", choices=WORKLOADS, default="single",
                        help="single: one question per clip; shared-prompt: the same under one long system prompt "
                             "every request shares; multi-turn: --turns questions per clip, each turn resending the "
                             "conversation (clip, questions, answers) when the previous one finishes")
    parser.add_argument("--turns", type=int, default=None,
                        help="multi-turn: requests per conversation (at least 2; default 3)")
    parser.add_argument("--num-requests", type=int, default=48,
                        help="requests (multi-turn: conversations, each of --turns requests)")
    parser.add_argument("--clip-seconds", type=float, nargs="+", default=[30.0])
    parser.add_argument("--output-tokens", type=int, nargs="+", default=[16],
                        help="answer lengths (every request generates exactly this many; several: a mix)")
    parser.add_argument("--request-rate", type=float, default=None,
                        help="Poisson arrivals per second (default: all at once, closed loop)")
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    parser.add_argument("--order", type=engine_order, default=None, metavar="ENGINES",
                        help="run exactly these engines in this order instead of vanilla then --retentions, e.g. "
                             "'vanilla,1.0,vanilla,1.0' (repeats are measured separately: how much identical engines "
                             "differ on this machine); a retention runs with the first --semantics")
    parser.add_argument("--policy", default=None,
                        help="selection policy (default: the engine's: coverage, headrouter in per_head mode)")
    parser.add_argument("--semantics", nargs="+", default=["after_prompt"],
                        choices=["after_prompt", "in_prompt", "prefill"],
                        help="HeadRouter engines to run at each retention (prefill: the prompt step skips the dropped "
                             "audio rows above the probe layer)")
    parser.add_argument("--modes", nargs="+", default=["shared"], choices=["shared", "per_head"],
                        help="HeadRouter engines to run at each retention and semantics (per_head: each KV head keeps "
                             "its own audio, packed at the mean budget, on HeadRouter's backend: the kernels' torch "
                             "references on CPU, slow; only after_prompt semantics; --policy must be a per-head one: "
                             "coverage, headrouter, oracle; unset, each engine's default: coverage shared, headrouter "
                             "per_head; --order runs the first mode only, so it takes one)")
    parser.add_argument("--kv-blocks", type=int, default=200, help="KV pool size in blocks (fixed, for all runs)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per engine step (long prompts prefill in chunks of this; default: vLLM's)")
    parser.add_argument("--admission-headroom", type=int, default=0, metavar="TOKENS",
                        help="HeadRouter runs: growth-aware admission (headrouter.admission_headroom; default 0, "
                             "vLLM's rule, as in the vanilla run, which always keeps vLLM's rule)")
    parser.add_argument("--encoder-window", choices=["on", "off"], default=None,
                        help="HeadRouter runs: Qwen2-Audio's encoder on the real audio only "
                             "(headrouter.encoder_window; default: the engine's, on); vanilla runs keep vLLM's "
                             "30 s encoder, except "
                             f"'{VANILLA_WINDOW}' in --order")
    parser.add_argument("--prefix-caching", choices=["on", "off"], default="on",
                        help="vLLM's prefix caching in every engine of the run (default on: vLLM's default, vanilla "
                             "as deployed; HeadRouter engines cache what precedes a routed request's audio)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-warmup-pass", dest="warmup_pass", action="store_false",
                        help="skip the unmeasured vanilla pass over the workload that runs first (without it, the "
                             "first engine meets every new tensor shape first and pays for it)")
    parser.add_argument("--out", default="benchmarks/results", help="results root: <out>/<machine>/<run name>/")
    parser.add_argument("--name", default=None, help="run name (default: a timestamp)")
    parser.add_argument("--export-workload", default=None,
                        help="also write the workload for `vllm bench serve --dataset-name custom_audio` here")


def main(args: argparse.Namespace) -> list[dict]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB; the pool itself is fixed by --kv-blocks
    from tqdm import tqdm

    from headrouter_vllm.benchmarks.serving import report
    from headrouter_vllm.benchmarks.serving.run import run_engine
    from headrouter_vllm.benchmarks.serving.workload import export_for_vllm_bench, make_workload

    source = report.source_state()  # the code that runs: read now, before anyone edits the tree during the run
    if (args.kv_blocks - 1) * args.block_size < args.max_model_len:  # vLLM keeps one block back (its null block)
        raise ValueError(f"--kv-blocks {args.kv_blocks} x --block-size {args.block_size} cannot hold one request of "
                         f"--max-model-len {args.max_model_len} (vLLM keeps one block back)")
    if "per_head" in args.modes:
        from headrouter_vllm.routing.policies import policy as policy_named

        if args.policy is not None and not policy_named(args.policy).per_head:
            raise ValueError(f"--modes per_head needs a per-head policy (coverage, headrouter, oracle), not "
                             f"{args.policy!r}: a per_head engine would run it shared")
        if "after_prompt" not in args.semantics or (args.order is not None and args.semantics[0] != "after_prompt"):
            raise ValueError("--modes per_head runs after_prompt semantics only: add it to --semantics")
    if args.order is not None and len(args.modes) > 1:
        raise ValueError("--order runs every retention with one mode: give --modes one value")
    if args.turns is not None and args.workload != "multi-turn":
        raise ValueError(f"--turns is for --workload multi-turn, not {args.workload}")
    if args.workload == "multi-turn" and args.turns is None:
        args.turns = 3  # the default, recorded with the results
    workload = make_workload(args.num_requests, args.clip_seconds, args.output_tokens, args.seed, args.request_rate,
                             args.workload, args.turns or 3)
    if args.export_workload:
        print("workload for vllm bench serve:", export_for_vllm_bench(workload, args.export_workload))
    engine_kwargs = dict(dtype=args.dtype, block_size=args.block_size, num_gpu_blocks_override=args.kv_blocks,
                         max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, enforce_eager=True,
                         load_format=args.load_format)
    if args.max_num_batched_tokens is not None:
        engine_kwargs.update(max_num_batched_tokens=args.max_num_batched_tokens, enable_chunked_prefill=True)
    with tempfile.TemporaryDirectory(prefix="headrouter-bench-") as tmp:
        model = args.model
        if not Path(model).is_dir():
            from headrouter_vllm.models.build import BUILDERS, make_model

            if model not in BUILDERS:
                raise ValueError(f"--model {model!r} is neither a model directory nor a builder: {sorted(BUILDERS)}")
            model = str(make_model(model, Path(tmp) / model))
        if (Path(model) / "HEADROUTER_DUMMY_WEIGHTS").exists() and engine_kwargs["load_format"] == "auto":
            engine_kwargs["load_format"] = "dummy"  # a real-shape config built without weights
        from headrouter_vllm.models import adapter_for_model_dir

        adapter, longest = adapter_for_model_dir(model), max(args.clip_seconds)
        if adapter.max_audio_seconds is not None and longest > adapter.max_audio_seconds:
            raise ValueError(f"--clip-seconds {longest:g}: {adapter.family} takes at most "
                             f"{adapter.max_audio_seconds:g} s of audio")
        text_tokens = _text_tokens(model, workload, max(args.output_tokens))
        if int(longest * 25) + text_tokens > args.max_model_len:
            raise ValueError(f"--clip-seconds {longest:g} is {int(longest * 25)} audio tokens: raise --max-model-len "
                             f"(now {args.max_model_len}) above that plus the text around it (up to {text_tokens} "
                             f"tokens in this workload: system prompt, questions, answers)")
        hr_window = None if args.encoder_window is None else args.encoder_window == "on"
        if args.order is not None:  # (retention, semantics, encoder window, mode)
            configs = [(None, None, True, None) if r == VANILLA_WINDOW else (r, None, None, None) if r is None
                       else (r, args.semantics[0], hr_window, args.modes[0]) for r in args.order]
        else:
            configs = [(None, None, None, None),
                       *((r, semantics, hr_window, mode) for mode in args.modes for semantics in args.semantics
                         for r in args.retentions if mode == "shared" or semantics == "after_prompt")]
        runs = []
        with tqdm(total=(len(configs) + args.warmup_pass) * len(workload), desc="bench", unit="req") as progress:
            if args.warmup_pass:
                progress.set_postfix_str("warm-up pass (not measured)")
                run_engine(model, workload, None, engine_kwargs, args.policy, progress,
                           prefix_caching=args.prefix_caching == "on")
            for retention, semantics, window, mode in configs:
                progress.set_postfix_str("vanilla" if retention is None else f"r={retention:g} {semantics} {mode}")
                runs.append(run_engine(model, workload, retention, engine_kwargs, args.policy, progress,
                                       semantics or "after_prompt", args.admission_headroom, window,
                                       args.prefix_caching == "on", mode or "shared"))
    seen: dict[str, int] = {}
    for run in runs:  # repeated engines (--order) keep apart in the tables: "vanilla", "vanilla #2", ...
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"
    audio = {}
    for run in runs:
        for r in run.requests:
            if r.audio_tokens is not None:
                audio[r.index] = r.audio_tokens
    rows = [report.summarise(run, audio) for run in runs]
    report.add_ratios(rows)
    info = report.machine()
    out_dir = Path(args.out) / report.machine_slug(info) / (args.name or time.strftime("%Y%m%d-%H%M%S"))
    meta = {"machine": info, "source": source,
            "command": shlex.join(["headrouter-vllm", *getattr(args, "argv", sys.argv[1:])]),
            "workload": {k: getattr(args, k) for k in ("num_requests", "clip_seconds", "output_tokens",
                                                       "request_rate", "kv_blocks", "block_size", "seed",
                                                       "policy", "load_format", "dtype", "semantics",
                                                       "max_num_batched_tokens", "warmup_pass", "order",
                                                       "admission_headroom", "encoder_window", "workload",
                                                       "turns", "prefix_caching", "modes")},
            "model": args.model if Path(args.model).is_dir() else f"{args.model} (built locally)"}
    report.write(out_dir, rows, runs, meta)
    print(report.table(rows))
    print("\nwhere the time went:")
    print(report.table(rows, report.PROFILE_COLUMNS))
    print(f"\nresults: {out_dir}")
    return rows
