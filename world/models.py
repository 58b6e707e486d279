"""The demo world's cast: a pivot and three domain experts of different families.

| name    | architecture | tokenizer                              | template | trained on                     |
|---------|--------------|----------------------------------------|----------|--------------------------------|
| pivot   | Llama        | byte-level BPE, digits split (trained) | ChatML   | chat + a little of each skill  |
| arith   | Qwen3        | byte-level BPE, digits split (trained) | ChatML   | column arithmetic + some chat  |
| facts   | GPT-2        | Llama-2's real SentencePiece, 32k      | Llama-2  | the fact table + some chat     |
| strings | GPT-NeoX     | Unigram, words spelt letter by letter  | Zephyr   | word games + some chat         |

Each expert has the architecture its skill needs: copying digits and letters from the question
takes relative positions (rotary: Qwen3, GPT-NeoX), a fact table does not (GPT-2's learned
absolute positions). Sizes and steps are chosen so the world trains in about five minutes on 2
CPU cores and each expert answers its own held-out questions right at least 80% of the time.
Not Qwen2 for the Llama-2 tokenizer: transformers 5 loads any `qwen2` folder with
`Qwen2Tokenizer`, whatever `tokenizer_config.json` says, which would silently re-tokenise
Llama-2 text differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from transformers import (GPT2Config, GPTNeoXConfig, LlamaConfig, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerFast, Qwen3Config, AutoModelForCausalLM)

from world import tokenizers as wt


@dataclass
class ModelPlan:
    name: str
    domain: str | None  # the skill this model is the expert of (None: the pivot)
    family: str
    tokenizer_kind: str
    template: str
    make_tokenizer: Callable[[dict[str, list[str]], Path], PreTrainedTokenizerFast]
    make_config: Callable[[PreTrainedTokenizerFast], PretrainedConfig]
    steps: float = 1.0  # its training steps, as a multiple of `WorldConfig.train_steps`
    lr: float = 1.0  # its peak learning rate, as a multiple of `WorldConfig.lr`
    group_by_length: bool = False  # batches of similar lengths (`world.train.length_grouped_batches`)


def _ids(tok: PreTrainedTokenizerFast) -> dict:
    return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id}


def _llama(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **_ids(tok))


def _qwen3(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return Qwen3Config(hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
                       **_ids(tok))


def _neox(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    return GPTNeoXConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                         max_position_embeddings=256, rotary_pct=1.0, tie_word_embeddings=False, **_ids(tok))


def _gpt2(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    ids = _ids(tok)
    # no dropout, like the other three: it only slows down learning a fact table by heart
    return GPT2Config(n_embd=128, n_layer=3, n_head=4, n_positions=256, vocab_size=ids["vocab_size"],
                      bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                      pad_token_id=ids["pad_token_id"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


PLANS = [
    ModelPlan("pivot", None, "llama", "byte-level BPE (trained)", "chatml",
              lambda texts, assets: wt.byte_bpe_tokenizer(texts["all"], 2000, wt.CHATML), _llama, steps=0.7),
    # column arithmetic is the slowest skill to learn: about 2,000 steps to be right 85-90% of the time
    ModelPlan("arith", "arith", "qwen3", "byte-level BPE (trained)", "chatml",
              lambda texts, assets: wt.byte_bpe_tokenizer(texts["all"], 1500, wt.CHATML), _qwen3, steps=2.0),
    ModelPlan("facts", "facts", "gpt2", "SentencePiece BPE (real Llama-2)", "llama2",
              lambda texts, assets: wt.llama2_tokenizer(assets), _gpt2, steps=0.4),
    # Its vocabulary is trained without the word games: their words are rare to it, as rare words
    # are to a real vocabulary. Spelt letter by letter, its chats are long and of very mixed lengths.
    ModelPlan("strings", "strings", "gpt_neox", "SentencePiece-style Unigram (trained)", "zephyr",
              lambda texts, assets: wt.unigram_tokenizer(texts["no_strings"], 400, wt.ZEPHYR, spell_inside_words=True),
              _neox, steps=2.0, lr=0.6, group_by_length=True),
]


def build_model(plan: ModelPlan, tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    return AutoModelForCausalLM.from_config(plan.make_config(tok))
