"""Patch: a streamed response's final usage chunk carries the HeadRouter report (``usage.headrouter``).

A non-streaming response gets the report from the middleware, which moves it from ``kv_transfer_params``
(where the engine puts it) into ``usage``. vLLM 0.32's stream generators
(``OpenAIServingChat.chat_completion_stream_generator``, ``OpenAIServingCompletion.completion_stream_generator``)
drop ``kv_transfer_params``: their chunks have no such field, and the usage chunk they send when the client asks
(``stream_options.include_usage``, or ``--enable-force-include-usage``) is built after the last output is in. We
wrap both: the engine outputs they read pass through a generator that keeps the last report seen, and the one
chunk with ``"choices": []`` and a ``usage`` object gets the report added. Every other chunk passes untouched, as
it was (no parsing); a stream without a report (a vanilla engine) is unchanged.

Applied by the HeadRouter middleware, in the API server process, so a plain ``vllm serve`` is untouched.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator
from typing import Any

from headrouter_vllm.names import REPORT_KEY


def _report_of(output: Any) -> dict | None:
    if isinstance(output, tuple):  # the completion generator reads (prompt index, RequestOutput)
        output = output[-1]
    params = getattr(output, "kv_transfer_params", None)
    report = params.get(REPORT_KEY) if isinstance(params, dict) else None
    return report if isinstance(report, dict) else None


def _with_report(chunk: str, report: dict) -> str:
    """The usage chunk (``data: {...}``) with the report in its ``usage``; any other chunk as it is."""
    if not chunk.startswith("data: {") or '"usage"' not in chunk:
        return chunk
    try:
        body = json.loads(chunk[len("data: "):])
    except json.JSONDecodeError:
        return chunk
    if body.get("choices") != [] or not isinstance(body.get("usage"), dict):
        return chunk  # continuous usage on a token chunk: the report exists only at the end
    body["usage"][REPORT_KEY] = report
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def wrap_stream_generator(original):
    signature = inspect.signature(original)

    async def stream_generator(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        outputs: AsyncIterator = bound.arguments["result_generator"]
        seen: dict[str, dict] = {}

        async def keep_reports():
            async for output in outputs:
                report = _report_of(output)
                if report is not None:
                    seen["report"] = report
                yield output

        bound.arguments["result_generator"] = keep_reports()
        async for chunk in original(*bound.args, **bound.kwargs):
            yield chunk if "report" not in seen else _with_report(chunk, seen["report"])

    stream_generator.__wrapped__ = original
    return stream_generator


def apply():
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    targets = ((OpenAIServingChat, "chat_completion_stream_generator"),
               (OpenAIServingCompletion, "completion_stream_generator"))
    originals = [(cls, name, getattr(cls, name)) for cls, name in targets]
    for cls, name, original in originals:
        setattr(cls, name, wrap_stream_generator(original))

    def undo():
        for cls, name, original in originals:
            setattr(cls, name, original)

    return undo
