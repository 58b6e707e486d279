"""Shared fixtures of the eval tests: tiny random chat models with real tokenizers, FastChat files.

(Imported by the other test_eval*.py files; it holds no tests itself.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from asset_paths import need_asset


def tokenizer_dir(name: str) -> Path:
    return need_asset(name)


def mt_bench_dir() -> Path:
    return need_asset("mt_bench")


def build_tiny_chat_model(out: Path, tokenizer: str, seed: int = 0, arch: str = "llama") -> Path:
    """A 2-layer random causal LM saved with a real tokenizer (and its chat template, if any)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer))
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """Llama architecture + the real Qwen3 tokenizer and ChatML template."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny_qwen"), "qwen3", seed=3)  # seed: it writes text


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory) -> Path:
    """GPT-2 architecture (absolute positions) + the real Llama-3 tokenizer and template."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny_llama3"), "llama3", seed=1, arch="gpt2")


@pytest.fixture(scope="session")
def tiny_no_template(tmp_path_factory) -> Path:
    """The real Llama-2 tokenizer, which ships no chat template."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny_llama2"), "llama2", seed=2)
