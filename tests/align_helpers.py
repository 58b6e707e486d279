"""Shared helpers of the alignment tests: the real tokenizers, loaded once per test session."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fuse.align.surface import TokenText

NAMES = ("llama2", "llama3", "qwen3", "gemma3")


@lru_cache(maxsize=None)
def token_texts(folder: str) -> TokenText:
    from transformers import AutoTokenizer

    return TokenText(AutoTokenizer.from_pretrained(folder))


def real_tokenizers(tokenizer_dirs: dict[str, Path]) -> dict[str, TokenText]:
    return {n: token_texts(str(tokenizer_dirs[n])) for n in NAMES}
