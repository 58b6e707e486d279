"""`fuse.align.surface.tokenizer_kind` reads the decoder's own JSON: the same kind as the whole
tokenizer's JSON gives, on every real tokenizer of the assets and on hand-made ones."""

from __future__ import annotations

import json

import pytest
from asset_paths import need_asset
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from core.loading import load_tokenizer
from fuse.align.surface import tokenizer_kind


def _kind_from_whole_json(tok) -> str:
    spec = json.dumps(json.loads(tok.backend_tokenizer.to_str()).get("decoder") or {})
    if '"ByteLevel"' in spec:
        return "byte_level"
    if "\\u2581" in spec or "▁" in spec or '"Metaspace"' in spec or '"ByteFallback"' in spec:
        return "sentencepiece"
    return "plain"


@pytest.mark.parametrize("name,kind", [("llama2", "sentencepiece"), ("llama3", "byte_level"), ("qwen3", "byte_level"),
                                       ("gemma3", "sentencepiece"), ("deepseek_v3", "byte_level")])
def test_real_tokenizers(name: str, kind: str) -> None:
    tok = load_tokenizer(need_asset(name))
    assert tokenizer_kind(tok) == _kind_from_whole_json(tok) == kind


@pytest.mark.parametrize("decoder,kind", [(None, "plain"), (decoders.WordPiece(), "plain"),
                                          (decoders.Metaspace(), "sentencepiece"),
                                          (decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()]), "sentencepiece"),
                                          (decoders.ByteLevel(), "byte_level")])
def test_hand_made_decoders(decoder, kind: str) -> None:
    backend = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    if decoder is not None:
        backend.decoder = decoder
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tokenizer_kind(tok) == _kind_from_whole_json(tok) == kind
