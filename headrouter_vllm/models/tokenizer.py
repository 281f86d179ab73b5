"""A byte-level BPE tokenizer trained locally in well under a second (no hub), with a Qwen chat template."""

from __future__ import annotations

CORPUS = [
    "hello world, this is a tiny test corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Transcribe the audio. What is said in this audio clip?",
    "You are a helpful assistant. Please answer the question.",
    "speech recognition, translation, summary, emotion, speaker, sound event",
    "0 1 2 3 4 5 6 7 8 9 ! ? . , ; : ' \" ( ) [ ] { }",
] * 20

# Qwen2-Audio's chat format: "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>" per audio part.
DEFAULT_SYSTEM_MESSAGE = ("{% if loop.first and message['role'] != 'system' %}"
                          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}")
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}"
    + DEFAULT_SYSTEM_MESSAGE +
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5-Omni's chat format: "<|audio_bos|><|AUDIO|><|audio_eos|>" per audio part, with no "Audio N:" prefix.
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}" + DEFAULT_SYSTEM_MESSAGE +
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(extra_specials=(), vocab_size: int = 512, chat_template: str = QWEN2_AUDIO_CHAT_TEMPLATE,
                    corpus: list[str] | None = None, named_specials: dict[str, str] | None = None):
    """``named_specials``: special tokens a processor reads as tokenizer attributes (e.g. ``audio_token``), added
    to ``extra_specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    extra_specials = [*extra_specials, *(t for t in (named_specials or {}).values() if t not in extra_specials)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS if corpus is None else corpus, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token=None,
                                 additional_special_tokens=list(extra_specials), model_max_length=32768,
                                 **({"extra_special_tokens": named_specials} if named_specials else {}))
    hf.chat_template = chat_template
    return hf
