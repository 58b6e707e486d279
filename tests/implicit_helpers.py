"""Helpers of the implicit-fusion tests: a tiny chat model with a word-level tokenizer and a ChatML
template, and preference rows in its words. (Imported by tests/test_implicit_*.py; no tests here.)"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(40)]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<pad>": 3, "user": 4, "assistant": 5, "system": 6}
    for w in WORDS:
        vocab[w] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<pad>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def tiny_chat_model(path: Path, seed: int = 0, classifier: bool = False) -> Path:
    """A 2-layer random Llama (or a 1-label sequence classifier) with the tiny tokenizer, saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, num_labels=1)
    model = LlamaForSequenceClassification(cfg) if classifier else LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sentence(rng: random.Random, lo: int = 2, hi: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def preference_rows(n: int, seed: int = 0, wrpo: bool = False) -> list[dict]:
    """Rows whose chosen answers follow a rule the model can learn (repeat the prompt's first word)
    and whose rejected answers do not: a preference signal that the losses can reduce."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = sentence(rng)
        first = q.split()[0]
        good = " ".join([first] * rng.randint(2, 4))
        bad = sentence(rng)
        row = {"id": i, "prompt": [{"role": "user", "content": q}],
               "chosen": [{"role": "assistant", "content": good}],
               "rejected": [{"role": "assistant", "content": bad}]}
        if wrpo:
            row["chosen_target"] = [{"role": "assistant", "content": " ".join([first] * rng.randint(1, 3))}]
        rows.append(row)
    return rows


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"id": r["id"], "prompt": r["prompt"], "completion": r["chosen"]} for r in preference_rows(n, seed)]
