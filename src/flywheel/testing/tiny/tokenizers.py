"""Tokenizers trained locally on a small caption/judge corpus, so tiny models need no download.

They use the same tokenizer classes (and for Qwen the real chat template and special tokens) as the
released models, so prompts are built and parsed by exactly the code that runs with real weights.
"""

from __future__ import annotations

import json

# Words the pipeline's prompts and answers use; repeated so BPE merges them into whole tokens
# (the judge reads the first answer token, so "yes"/"no" must be single tokens, as in real Qwen).
_WORDS = (
    "a photo of fw_test character wearing a red jacket standing in a park smiling at the camera "
    "describe the image caption this picture answer yes or no is the same person does it match "
    "Yes No yes no the identity outfit hair face background lighting pose close up full body "
    "an astronaut in a white suit make it blue change the background to a beach keep the face "
    "You are a helpful assistant. system user assistant"
)
CORPUS: list[str] = [_WORDS] * 20 + [w for w in _WORDS.split() for _ in range(3)] + ["yes", "no", "Yes", "No"] * 30

QWEN_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

# The chat template shipped with Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct (chat_template.json).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen2_tokenizer(vocab_size: int = 400):
    """A byte-level BPE ``Qwen2TokenizerFast`` with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    data = json.loads(tok.to_str())
    merges = [tuple(m) for m in data["model"]["merges"]]  # Qwen2TokenizerFast needs tuples, not "a b" strings
    qtok = Qwen2TokenizerFast(
        vocab=data["model"]["vocab"], merges=merges, unk_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    qtok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    qtok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return qtok


def clip_tokenizer(vocab_size: int = 300, max_length: int = 77):
    """A ``CLIPTokenizer`` retrained on the corpus (keeps CLIP's normalizer and pre-tokenizer)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(model_max_length=max_length).train_new_from_iterator(CORPUS, vocab_size=vocab_size)
