"""The demo world's cast: a pivot and three domain experts of different families.

| name    | architecture | tokenizer                         | template | trained on          |
|---------|--------------|-----------------------------------|----------|---------------------|
| pivot   | Llama        | byte-level BPE (trained, 2k)      | ChatML   | chat + a little of each skill |
| arith   | Qwen3        | Llama-2's real SentencePiece, 32k | Llama-2  | arithmetic + chat   |
| facts   | GPT-NeoX     | byte-level BPE (trained, 3k)      | ChatML   | fact table + chat   |
| strings | GPT-2        | SentencePiece-style Unigram       | Zephyr   | word games + chat   |

Sizes are chosen so the whole world trains in a few minutes on 2 CPU cores. Not Qwen2 for the
Llama-2 tokenizer: transformers 5 loads any `qwen2` folder with `Qwen2Tokenizer`, whatever
`tokenizer_config.json` says, which would silently re-tokenise Llama-2 text differently.
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
    make_tokenizer: Callable[[list[str], Path], PreTrainedTokenizerFast]
    make_config: Callable[[PreTrainedTokenizerFast], PretrainedConfig]


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
                         max_position_embeddings=256, rotary_pct=0.5, tie_word_embeddings=False, **_ids(tok))


def _gpt2(tok: PreTrainedTokenizerFast) -> PretrainedConfig:
    ids = _ids(tok)
    return GPT2Config(n_embd=128, n_layer=3, n_head=4, n_positions=256, vocab_size=ids["vocab_size"],
                      bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                      pad_token_id=ids["pad_token_id"])


PLANS = [
    ModelPlan("pivot", None, "llama", "byte-level BPE (trained)", "chatml",
              lambda texts, assets: wt.byte_bpe_tokenizer(texts, 2000, wt.CHATML), _llama),
    ModelPlan("arith", "arith", "qwen3", "SentencePiece BPE (real Llama-2)", "llama2",
              lambda texts, assets: wt.llama2_tokenizer(assets), _qwen3),
    ModelPlan("facts", "facts", "gpt_neox", "byte-level BPE (trained)", "chatml",
              lambda texts, assets: wt.byte_bpe_tokenizer(texts, 3000, wt.CHATML), _neox),
    ModelPlan("strings", "strings", "gpt2", "SentencePiece-style Unigram (trained)", "zephyr",
              lambda texts, assets: wt.unigram_tokenizer(texts, 1500, wt.ZEPHYR), _gpt2),
]


def build_model(plan: ModelPlan, tok: PreTrainedTokenizerFast) -> PreTrainedModel:
    return AutoModelForCausalLM.from_config(plan.make_config(tok))
