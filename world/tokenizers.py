"""Tokenizers and chat templates of the demo world.

Three tokenizer kinds, as in real model families: Llama-2's real 32k SentencePiece vocabulary
(`▁` spaces, byte fallback, one token per digit), and two trained here with the `tokenizers`
library (a real vocabulary of 128k+ is too large for a CPU-sized model): a GPT-style byte-level
BPE (`Ġ` spaces) that splits numbers into single digits, as Llama and Qwen do, so column
arithmetic can be learnt digit by digit; and a SentencePiece-style Unigram (`▁` spaces) with
punctuation split off, which can be told to spell words letter by letter.
"""

from __future__ import annotations

import json
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
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok, template, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
                 unk_token="<|endoftext|>")


def unigram_tokenizer(texts: Iterable[str], vocab_size: int, template: str = ZEPHYR,
                      spell_inside_words: bool = False) -> PreTrainedTokenizerFast:
    """SentencePiece-style Unigram with `▁` for spaces, punctuation split off; Zephyr-style specials.

    `spell_inside_words` keeps, of the trained pieces, the specials, the single characters and the
    pieces that start a word (`▁...`): a word not preceded by a space, like a quoted one, is then
    read letter by letter, which is what spelling games need.
    """
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation("isolated"),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    pieces = spec["model"]["vocab"][len(specials):]
    if spell_inside_words:
        pieces = [[p, score] for p, score in pieces if len(p) == 1 or p[0] == "▁"]
    # The trainer is multi-threaded: its scores vary in the last digits and pieces of equal score
    # come in no fixed order. Rounded and sorted, the same texts always give the same vocabulary
    # and ids, hence the same model.
    pieces = [[p, round(score, 6)] for p, score in pieces]
    kept = spec["model"]["vocab"][:len(specials)] + sorted(pieces, key=lambda ps: (-ps[1], ps[0]))
    spec["model"]["vocab"] = kept
    spec["model"]["unk_id"] = 0
    assert [p for p, _ in kept[:len(specials)]] == specials and [t["id"] for t in spec["added_tokens"]] == list(
        range(len(specials)))  # the specials keep ids 0..6
    return _wrap(Tokenizer.from_str(json.dumps(spec)), template, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                 unk_token="<unk>")
