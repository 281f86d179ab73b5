"""An HF-transformers reference of HeadRouter on Qwen2-Audio (eager attention, fp32), independent of the engine's
attention code: full prefill; the probe from ``output_attentions[probe_layer]`` (the rows after the audio, mean over
rows, at the audio columns; the last row for FastV; value vectors from ``v_proj`` for the similarity policy); the
kept set from the plain policies of ``tests/plain_policies.py`` (written from the policies' definitions, not from
the engine's routing code, so that equal kept sets test the selection too); the other audio KV deleted from every
layer; greedy decode with the original positions. ``in_prompt``: the prefill is re-run with the rows after the audio
masked from the dropped audio in layers above the probe layer. ``per_head``: each KV head keeps its own set; the
audio KV stays in the cache and every decode step masks, per head, the audio that head dropped. ``first_token``: the
prompt runs dense and gives the first token; the first decode step runs once with attentions (its row at the probe
layer is the probe, also FastV's row), then again from the prompt's cache with the dropped audio masked in the
layers above the probe layer, and the dropped audio is deleted after it. ``routed``: timed as ``first_token``; the
probe holds both the prompt rows' mean and the first token's row, and the plain policies pick between them."""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import torch

from headrouter_vllm.config import HeadRouterConfig


@functools.cache
def load(model_dir: str):
    """The model (Qwen2-Audio, or the Qwen2.5-Omni thinker from an Omni checkpoint) and its processor."""
    from transformers import AutoConfig, AutoProcessor, Qwen2AudioForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir)
    if "Qwen2_5OmniModel" in (config.architectures or ()):
        from safetensors.torch import load_file
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        thinker = config.thinker_config
        thinker._attn_implementation = "eager"
        for sub in (thinker.text_config, thinker.audio_config, thinker.vision_config):
            sub._attn_implementation = "eager"
        model = Qwen2_5OmniThinkerForConditionalGeneration(thinker).to(torch.float32)
        state = {k.removeprefix("thinker."): v for k, v in load_file(f"{model_dir}/model.safetensors").items()}
        model.load_state_dict(state, strict=True)
        model.eval()
    else:
        model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def decoder_layers(model):
    inner = model.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


def audio_token_id(model) -> int:
    config = model.config
    return config.audio_token_id if hasattr(config, "audio_token_id") else config.audio_token_index


def keep_count(r: float, n: int) -> int:
    return max(1, min(n, math.floor(r * n + 0.5)))


def audio_runs(is_audio: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, length)`` of each contiguous run of audio tokens (one per clip)."""
    pos = is_audio.nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for p in pos:
        if runs and p == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return [(a, b) for a, b in runs]


@contextlib.contextmanager
def probe_attention(model, probe_layer: int):
    """Collects the probe layer's attention probabilities ``[B, Hq, q, k]`` of a forward run with
    ``output_attentions``; the other layers' are dropped as they are made (at 300 s each layer's are 1.8 GB)."""
    probs: list[torch.Tensor] = []

    def keep(module, args, out):
        probs.append(out[1])
        return out[0], None

    hooks = [layer.self_attn.register_forward_hook(keep if i == probe_layer else (lambda m, a, out: (out[0], None)))
             for i, layer in enumerate(decoder_layers(model))]
    try:
        yield probs
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def reference(model_dir: str, prompt: str, wave, retention: float, max_tokens: int, probe_layer: int = 2,
              semantics: str = "after_prompt", policy: str | None = None, task: str = "auto", seed: int = 0,
              profiles=None, mode: str = "shared", per_head_cap: float = 1.5, probe_point: str = "prompt",
              focus=None, kv_shards: int = 1) -> dict:
    """``wave``: one clip, a list of clips (one per audio part of the prompt, each routed on its own), or None.
    ``focus``: the region policy's windows in seconds (``headrouter_focus``). ``kv_shards``: per_head budgets
    balanced within each tensor parallel rank's KV heads."""
    if policy is None:  # the engine's default for requests that name none
        policy = "headrouter" if mode == "per_head" else HeadRouterConfig().default_policy
    model, processor = load(model_dir)
    waves = [] if wave is None else list(wave) if isinstance(wave, (list, tuple)) else [wave]
    if not waves:
        inputs = processor.tokenizer(prompt, return_tensors="pt")
    else:
        inputs = processor(text=prompt, audio=waves, sampling_rate=16000, return_tensors="pt")
    ids = inputs["input_ids"]
    length = ids.shape[1]
    kwargs = dict(input_ids=ids, attention_mask=inputs["attention_mask"], use_cache=True)
    if waves:
        kwargs.update(input_features=inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"])
    info: dict = dict(prompt_ids=ids[0].tolist(), length=length)
    kept = per_head_mask = None  # kept: the kept audio positions (absolute), when the dropped audio is deleted
    if waves:
        is_audio = ids[0] == audio_token_id(model)
        spans = audio_runs(is_audio)
        info.update(start=spans[0][0], audio_tokens=int(is_audio.sum()), spans=spans)
    if waves and retention < 1.0:
        from headrouter_vllm.models import adapter_for_model_dir
        from headrouter_vllm.plan import focus_tokens
        from headrouter_vllm.routing.policies.base import RouteSettings, SpanProbe
        from tests.plain_policies import plain_selection

        values = []
        hook = decoder_layers(model)[probe_layer].self_attn.v_proj.register_forward_hook(
            lambda m, a, out: values.append(out[0]))
        try:
            with probe_attention(model, probe_layer) as probs:
                out = model(**kwargs, output_attentions=True)
        finally:
            hook.remove()
        num_kv = model.config.text_config.num_key_value_heads
        prompt_attn = probs[0][0][:, spans[-1][0] + spans[-1][1]:length]  # [Hq, rows after the audio, L]
        if probe_point in ("first_token", "routed"):
            first = int(out.logits[0, -1].argmax())
            prompt_cache = copy.deepcopy(out.past_key_values)
            step = dict(input_ids=torch.tensor([[first]]), position_ids=torch.tensor([[length]]),
                        attention_mask=torch.ones(1, length + 1, dtype=torch.long), use_cache=True)
            with probe_attention(model, probe_layer) as probs:
                model(**step, past_key_values=out.past_key_values, output_attentions=True)
            attn = probs[0][0]  # [Hq, 1, L + 1]
        else:
            attn = prompt_attn
        kept, per_head, keeps = [], [], []
        tokens_per_second = adapter_for_model_dir(model_dir).audio_tokens_per_second
        for start, n in spans:  # each clip is routed on its own
            probe = SpanProbe(head_scores=attn[:, :, start:start + n].mean(dim=1),
                              last_row=attn[:, -1, start:start + n], num_kv_heads=num_kv,
                              values=values[0][start:start + n].view(n, num_kv, -1),
                              prompt_scores=prompt_attn[:, :, start:start + n].mean(dim=1)
                              if probe_point == "routed" else None)
            keep = keep_count(retention, n)
            cap = min(n, math.ceil(per_head_cap * keep - 1e-9)) if mode == "per_head" else None
            settings = RouteSettings(policy=policy, mode=mode, task=task, seed=seed, b_max=cap, kv_shards=kv_shards,
                                     focus=focus_tokens(focus, tokens_per_second), probe_point=probe_point)
            selection = plain_selection(probe, keep, settings, profiles)
            kept.append(start + selection.kept)
            per_head.append([start + head for head in selection.per_head] if mode == "per_head" else None)
            keeps.append(keep)
            info.setdefault("margins", []).append(selection.margin)
            info.setdefault("alphas", []).append(selection.alpha)
        kept = torch.cat(kept)
        info.update(kept=kept.tolist(), keep=sum(keeps), keeps=keeps, margin=info["margins"][0],
                    alpha=info["alphas"][0])
        if mode == "per_head":
            heads = [torch.cat(h) for h in zip(*per_head, strict=True)]
            info["kept_per_head"] = [h.tolist() for h in heads]
            dropped = is_audio[None].repeat(num_kv, 1)
            for g, head in enumerate(heads):
                dropped[g, head] = False
            group = model.config.text_config.num_attention_heads // num_kv
            per_head_mask = dropped.repeat_interleave(group, dim=0)  # [Hq, L]
            kept = None  # nothing is deleted from the cache: each head masks its own dropped audio
        if semantics == "in_prompt":
            out = _prefill_kept_only(model, kwargs, length, is_audio, spans[-1][0] + spans[-1][1], kept, probe_layer)
        elif semantics == "prefill":  # above the probe layer the dropped audio is gone for every row
            out = _prefill_kept_only(model, kwargs, length, is_audio, 0, kept, probe_layer)
    else:
        out = model(**kwargs)
    tokens, logprobs, done = [], [], 0
    if probe_point in ("first_token", "routed") and kept is not None:
        # the first token came from the dense prompt; its step attends above the probe layer to the kept audio only
        tokens.append(first)
        logprobs.append(float(torch.log_softmax(out.logits[0, -1].float(), dim=-1)[first]))
        visible = torch.ones(length + 1, dtype=torch.bool)
        visible[:length][is_audio] = False
        visible[kept] = True
        mask = torch.zeros(1, 1, 1, length + 1).masked_fill_(~visible, torch.finfo(torch.float32).min)
        out = _with_attention_mask(model, range(probe_layer + 1, len(decoder_layers(model))), mask,
                                   **step, past_key_values=prompt_cache)
        done = 1
    cache = out.past_key_values
    if kept is not None:
        survives = torch.ones(length + done, dtype=torch.bool)
        survives[:length][is_audio] = False
        survives[kept] = True
        keep_idx = survives.nonzero().flatten()
        for layer in cache.layers:  # [B, Hkv, T, d]
            layer.keys = layer.keys[:, :, keep_idx].contiguous()
            layer.values = layer.values[:, :, keep_idx].contiguous()
    logits = out.logits[0, -1]
    for i in range(done, max_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(torch.log_softmax(logits.float(), dim=-1)[token]))
        step = dict(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[length + i]]),
                    attention_mask=torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long),
                    past_key_values=cache, use_cache=True)
        if per_head_mask is None:
            o = model(**step)
        else:
            visible = torch.cat([~per_head_mask, torch.ones(per_head_mask.shape[0], i + 1, dtype=torch.bool)], dim=1)
            mask = torch.zeros(1, visible.shape[0], 1, visible.shape[1]).masked_fill_(
                ~visible[None, :, None], torch.finfo(torch.float32).min)
            o = _with_attention_mask(model, range(len(decoder_layers(model))), mask, **step)
        cache, logits = o.past_key_values, o.logits[0, -1]
    info["tokens"], info["logprobs"] = tokens, logprobs
    return info


def _prefill_kept_only(model, kwargs, length, is_audio, audio_end, kept, probe_layer):
    """The prompt with the rows from ``audio_end`` on masked from the dropped audio in the layers above the probe:
    the rows after the last clip (``in_prompt``), or every row but the dropped ones (``prefill``, audio_end 0)."""
    dropped = is_audio.clone()
    dropped[kept] = False
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
    rows = torch.zeros(length, dtype=torch.bool)
    rows[audio_end:] = True
    rows &= ~dropped  # a dropped row's own output is never used (the engine does not compute it)
    allowed[rows] &= ~dropped[None, :]
    mask = torch.zeros(1, 1, length, length).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return _with_attention_mask(model, range(probe_layer + 1, len(decoder_layers(model))), mask,
                                **kwargs)


def _with_attention_mask(model, layer_indices, mask: torch.Tensor, **kwargs):
    """Run the model with ``mask`` (additive, ``[1, 1 or Hq, q, k]``) as the attention mask of the given layers."""
    def pre(module, args, kw):
        kw["attention_mask"] = mask
        return args, kw

    layers = decoder_layers(model)
    hooks = [layers[i].self_attn.register_forward_pre_hook(pre, with_kwargs=True) for i in layer_indices]
    try:
        return model(**kwargs)
    finally:
        for h in hooks:
            h.remove()
