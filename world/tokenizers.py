"""Tokenizers and chat templates of the demo world.

Three tokenizer kinds, as in real model families: Llama-2's real 32k SentencePiece vocabulary
(`▁` spaces, byte fallback), and two trained here with the `tokenizers` library (a real
vocabulary of 128k+ is too large for a CPU-sized model): a GPT-style byte-level BPE (`Ġ`
spaces) and a SentencePiece-style Unigram (`▁` spaces) with their own sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-2: a system prompt is folded into the first user turn, as Meta's template does.
LLAMA2 = ("{% if messages and messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] "
          "+ '\\n<</SYS>>\\n\\n' %}{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}"
          "{% endif %}{% for m in msgs %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
          "{% if loop.first %}{{ sys }}{% endif %}{{ m['content'].strip() }} [/INST]{% else %} "
          "{{ m['content'].strip() }} {{ eos_token }}{% endif %}{% endfor %}")
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "zephyr": ZEPHYR}


def llama2_tokenizer(assets: Path) -> PreTrainedTokenizerFast:
    """The real Llama-2 tokenizer from the asset folder (`core.assets`), given Llama-2's chat template."""
    folder = assets / "tokenizers" / "llama2"
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: Llama-2 tokenizer files not found (run `python -m core.assets fetch`)")
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = LLAMA2
    tok.pad_token = tok.unk_token
    return tok


def _wrap(tok: Tokenizer, template: str, **special: str) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.chat_template = template
    return fast


def byte_bpe_tokenizer(texts: Iterable[str], vocab_size: int, template: str = CHATML) -> PreTrainedTokenizerFast:
    """GPT-style byte-level BPE (`Ġ` marks a space), ChatML specials."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok, template, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                 unk_token="<|endoftext|>")


def unigram_tokenizer(texts: Iterable[str], vocab_size: int, template: str = ZEPHYR) -> PreTrainedTokenizerFast:
    """SentencePiece-style Unigram with `▁` for spaces; Zephyr-style specials."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok, template, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
