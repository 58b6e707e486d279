"""Token surface forms → the text each token stands for, for any Hugging Face fast tokenizer.

Alignment compares token *strings*, but every tokenizer family spells them differently:

* byte-level BPE (GPT-2, Llama-3, Qwen): each byte is written as a printable stand-in (`Ġ` for a
  space, `Ċ` for a newline); the byte decoder maps them back to bytes;
* SentencePiece (Llama-2, Gemma, Mistral): `▁` stands for a space and characters outside the
  vocabulary fall back to byte tokens `<0x0A>`;
* added / special tokens (`<|im_end|>`, `<end_of_turn>`) are literal text.

`TokenText.bytes_of(id)` is the exact byte string a token stands for; `TokenText.text(id)` is its
text: those bytes decoded as UTF-8, where a byte that is only part of a character (a 4-byte emoji
split over two byte-level tokens) becomes one opaque code point (Python's `surrogateescape`), so
two tokenizers that split a character the same way still produce equal strings and edit distance
counts a missing byte as one edit. `in_context` removes the space a SentencePiece tokenizer
prepends to the first word of a text (`▁Hello` at offset 0 stands for `Hello`).
"""

from __future__ import annotations

import json
import re
from operator import itemgetter
from typing import Any, Sequence

import numpy as np

from core.errors import PivotfuseError

_HEX = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (used by every byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_DECODER: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def tokenizer_kind(tokenizer: Any) -> str:
    """'byte_level', 'sentencepiece' (▁ spaces, maybe byte fallback) or 'plain', from the decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        name = getattr(tokenizer, "name_or_path", "tokenizer")
        raise PivotfuseError(f"{name}: needs a fast tokenizer (tokenizer.json) for character offsets")
    decoder = getattr(backend, "decoder", None)
    # The decoder's own JSON, not the whole tokenizer's: serialising a 152k vocabulary to read one
    # field took a third of a second, twice per pair, in the serial setup of every alignment.
    spec = json.dumps(json.loads(decoder.__getstate__())) if decoder is not None else "{}"
    if '"ByteLevel"' in spec:
        return "byte_level"
    if "\\u2581" in spec or "▁" in spec or '"Metaspace"' in spec or '"ByteFallback"' in spec:
        return "sentencepiece"
    return "plain"


def surface_bytes(token: str, kind: str) -> bytes:
    """The bytes a vocabulary entry (as `convert_ids_to_tokens` spells it) stands for."""
    if kind == "byte_level":
        try:
            return bytes(BYTE_DECODER[c] for c in token)
        except KeyError:  # not a byte-level spelling (should only be added tokens)
            return token.encode("utf-8")
    if kind == "sentencepiece":
        m = _HEX.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("▁", " ").encode("utf-8")
    return token.encode("utf-8")


def bytes_to_text(data: bytes) -> str:
    """UTF-8 decode; a byte that does not complete a character becomes one lone surrogate."""
    return data.decode("utf-8", "surrogateescape")


class TokenText:
    """Cached id → normalised text for one tokenizer (lazy per id, or the whole vocabulary)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.kind = tokenizer_kind(tokenizer)
        self.name = str(getattr(tokenizer, "name_or_path", "tokenizer"))
        self.vocab_size = len(tokenizer)
        # Added tokens are literal text: never byte-decoded or ▁-replaced.
        self.added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self.special_ids = {int(i) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        self.special_ids |= {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
        self._bytes: dict[int, bytes] = {}
        self._text: dict[int, str] = {}
        self._spelled: list | None = None  # convert_ids_to_tokens of the whole vocabulary, once asked
        self._vocab: list[bytes] | None = None
        self._lead = np.zeros(self.vocab_size, dtype=np.int8)  # see _leading_space

    def raw(self, token_id: int) -> str:
        """The vocabulary spelling of a token ('' for an id outside the vocabulary)."""
        if token_id in self.added:
            return self.added[token_id]
        if self._spelled is not None and 0 <= token_id < len(self._spelled):
            tok = self._spelled[token_id]
            return tok if isinstance(tok, str) else ""
        tok = self.tokenizer.convert_ids_to_tokens(int(token_id))
        return tok if isinstance(tok, str) else ""

    def bytes_of(self, token_id: int) -> bytes:
        b = self._bytes.get(token_id)
        if b is None:
            tok = self.raw(token_id)
            b = self._added_bytes(token_id) if token_id in self.added else surface_bytes(tok, self.kind)
            self._bytes[token_id] = b
        return b

    def _added_bytes(self, token_id: int) -> bytes:
        """Added tokens are literal, but SentencePiece ones spell spaces as ▁ (Gemma's `▁▁`)."""
        content = self.added[token_id]
        if self.kind == "sentencepiece" and token_id not in self.special_ids:
            content = content.replace("▁", " ")
        return content.encode("utf-8")

    def text(self, token_id: int) -> str:
        t = self._text.get(token_id)
        if t is None:
            t = self._text[token_id] = bytes_to_text(self.bytes_of(token_id))
        return t

    def texts(self, ids: Sequence[int]) -> list[str]:
        try:  # every id seen before: one C-level lookup of all of them
            return list(itemgetter(*ids)(self._text)) if len(ids) > 1 else [self._text[int(i)] for i in ids]
        except (KeyError, TypeError):
            text = self.text
            return [text(i) for i in map(int, ids)]

    def _leading_space(self, ids: Sequence[int]) -> np.ndarray:
        """(n,) does token ids[k]'s text start with a space? One gather from a per-id table
        (0 not yet known, 1 no, 2 yes) that fills as ids are met."""
        idx = np.asarray(ids, dtype=np.int64)
        if len(self._lead) <= idx.max(initial=-1):
            self._lead = np.concatenate([self._lead, np.zeros(int(idx.max()) + 1 - len(self._lead), dtype=np.int8)])
        new = np.unique(idx[self._lead[idx] == 0])
        if len(new):
            self._lead[new] = [2 if self.text(i)[:1] == " " else 1 for i in new.tolist()]
        return self._lead[idx] == 2

    def is_byte_fallback(self, token_id: int) -> bool:
        """True for SentencePiece `<0xNN>` tokens (a second spelling of a byte)."""
        return self.kind == "sentencepiece" and token_id not in self.added and bool(_HEX.match(self.raw(token_id)))

    def vocabulary(self) -> list[bytes]:
        """Bytes of every id 0..vocab_size-1 (fills the cache; one pass over the vocabulary)."""
        if self._vocab is not None:
            return self._vocab
        spelled = self._spelled = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        out = []
        for i, tok in enumerate(spelled):
            if i in self.added:
                b = self._added_bytes(i)
            else:
                b = surface_bytes(tok if isinstance(tok, str) else "", self.kind)
            self._bytes[i] = b
            out.append(b)
        self._vocab = out
        return out

    def in_context(self, ids: Sequence[int], offsets: Sequence[Sequence[int]], text: str) -> list[str]:
        """Token texts, minus the space a SentencePiece tokenizer prepends to the first word.

        A token whose text starts with a space that is not in the source text at its offset
        (`▁Hello` covering `Hello`) stands for the text without it.
        """
        out = self.texts(ids.tolist() if isinstance(ids, np.ndarray) else ids)
        if self.kind != "sentencepiece" or not out:
            return out
        idx = np.asarray(ids, dtype=np.int64)
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        start, end = off[:, 0], off[:, 1]
        k = np.flatnonzero(self._leading_space(idx) & (end > start) & (start < len(text)))
        if len(k):  # ... at an offset whose character is not a space: compare those few in Python
            chars = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            k = k[chars[start[k]] != 32]
            for k, s, e in zip(k.tolist(), start[k].tolist(), end[k].tolist()):
                if out[k][1:] == text[s:e]:
                    out[k] = out[k][1:]
        return out
