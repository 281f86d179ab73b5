"""Head analysis on the listening model (``python -m headrouter_vllm.benchmarks.quality.heads``).

For validation clips and every question, with HF transformers (eager attention, fp32), per layer and head:

* **selectivity** of the attention over the audio keys (1 - entropy / log N), and
* **relevant share**: the fraction of the head's audio attention that lands on the part of the clip the
  question is about (speech for digits / words / voice, the beeps for beeps / pitch, the event for event;
  ``noise`` is left out), divided by that part's share of the audio tokens (1.0 = no preference),

at two kinds of rows: the **prompt rows** after the audio (what the engine probes) and the **first answer
token's row** (the task tag, teacher-forced, whose output starts the value). Averaged per task group. A head
that routes by task shows a relevant share well above 1 and different behaviour between the groups.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from headrouter_vllm.listening import suite
from headrouter_vllm.listening.train import prompt_text


def region_mask(clip: suite.Clip, task: str, n: int) -> torch.Tensor | None:
    region = suite.TASK_REGION[task]
    if region == "all":
        return None
    start, end = clip.regions[region]
    centres = (torch.arange(n) + 0.5) / suite.TOKENS_PER_SECOND
    return (centres >= start) & (centres < end)


@torch.no_grad()
def analyse(model_dir: str, clips: int) -> dict:
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    audio_id = model.config.audio_token_id
    sums: dict = {}
    for clip in suite.generate("validation", clips, workers=1):
        for task in clip.answers:
            tag = processor.tokenizer(task, add_special_tokens=False)["input_ids"]
            inputs = processor(text=prompt_text(suite.QUESTIONS[task]), audio=[clip.wave], sampling_rate=16000,
                               return_tensors="pt")
            ids = torch.cat([inputs["input_ids"], torch.tensor([tag])], dim=1)  # teacher-forced answer tag
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=inputs["input_features"],
                        feature_attention_mask=inputs["feature_attention_mask"], output_attentions=True)
            pos = (ids[0] == audio_id).nonzero().flatten()
            s, n, prompt_len = int(pos[0]), int(pos.numel()), inputs["input_ids"].shape[1]
            mask = region_mask(clip, task, n)
            rows = {"prompt_rows": slice(s + n, prompt_len), "answer_row": slice(prompt_len, prompt_len + 1)}
            group = suite.TASK_GROUPS[task]
            for layer, attn in enumerate(out.attentions):  # [1, H, L, L]
                for kind, sl in rows.items():
                    a = attn[0, :, sl, s:s + n]  # [H, rows, N]
                    mass = a.sum(-1, keepdim=True).clamp_min(1e-12)
                    p = a / mass
                    sel = 1 - (-(p * p.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(n)))).mean(-1)
                    entry = sums.setdefault((kind, layer, group), {"sel": 0, "rel": 0, "n": 0, "n_rel": 0})
                    entry["sel"] = entry["sel"] + sel
                    entry["n"] += 1
                    if mask is not None and 0 < int(mask.sum()) < n:
                        share = (p[..., mask].sum(-1)).mean(-1) / (mask.float().mean())
                        entry["rel"] = entry["rel"] + share
                        entry["n_rel"] += 1
    result = {}
    for (kind, layer, group), e in sums.items():
        result.setdefault(kind, {}).setdefault(str(layer), {})[group] = {
            "selectivity": [round(float(x), 3) for x in e["sel"] / e["n"]],
            "relevant_share": [round(float(x), 2) for x in e["rel"] / max(e["n_rel"], 1)]}
    return result


def markdown(result: dict) -> str:
    lines = []
    for kind, layers in result.items():
        lines.append(f"\n**{kind.replace('_', ' ')}** (per head: selectivity semantic/acoustic; relevant share "
                     "semantic/acoustic)\n")
        heads = len(next(iter(layers.values()))["semantic"]["selectivity"])
        lines.append("| layer | " + " | ".join(f"h{h}" for h in range(heads)) + " |")
        lines.append("|---|" + "---|" * heads)
        for layer, groups in sorted(layers.items(), key=lambda kv: int(kv[0])):
            sem, aco = groups["semantic"], groups["acoustic"]
            cells = [f"{sem['selectivity'][h]:.2f}/{aco['selectivity'][h]:.2f}; "
                     f"{sem['relevant_share'][h]:.1f}/{aco['relevant_share'][h]:.1f}" for h in range(heads)]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="listening model directory (make-model listening-qwen2-audio)")
    p.add_argument("--clips", type=int, default=40, help="validation clips")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write (a .md beside it)")
    a = p.parse_args(argv)
    result = analyse(a.model, a.clips)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    a.out.with_suffix(".md").write_text(f"# Head analysis: `{a.model}`, {a.clips} validation clips\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
