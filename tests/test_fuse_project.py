"""Span translation of a source distribution onto pivot tokens, on a hand-made example with exact numbers.

Pivot: Llama-3 (byte-level; ` 18` is ` ` + `18`). Source: Llama-2 (SentencePiece; `18` is `1`, `8`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.chat import render_chat, tokenize_chat
from fuse.targets.translate import PivotProjector, SpanTranslator
from fuse.extract.store import TeacherRecord
from fuse.align.surface import TokenText
from fuse.targets.pairing import pair_positions, reply_keys, token_chars

L3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
      "{% endfor %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
MSGS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Hello x 18."}]


def record(tok, template, topk: dict[str, list[tuple[str, float]]]) -> TeacherRecord:
    """Scored tokens of MSGS; `topk[token text]` gives the distribution stored for that token."""
    r = render_chat(tok, MSGS, template)
    tc = tokenize_chat(tok, r)
    pos = [i for i, a in enumerate(tc.assistant) if a and i >= 1]
    texts = [r.text[slice(*tc.offsets[i])] for i in pos]
    ids = np.full((len(pos), 3), -1, np.int32)
    lp = np.full((len(pos), 3), -np.inf, np.float32)
    for j, t in enumerate(texts):
        for c, (name, p) in enumerate(topk.get(t, [])):
            ids[j, c], lp[j, c] = tok.convert_tokens_to_ids(name), math.log(p)
    gold = np.asarray(tc.input_ids)[pos]
    gold_lp = np.array([lp[j][list(ids[j]).index(g)] if g in ids[j] else -5.0 for j, g in enumerate(gold)], np.float32)
    return TeacherRecord(index=0, id="c", domain=None, text=r.text, assistant_spans=np.asarray(r.assistant_spans, np.int32),
                         token_ids=gold.astype(np.int32), spans=np.asarray([tc.offsets[i] for i in pos], np.int32),
                         topk_ids=ids, topk_logprobs=lp.astype(np.float16), gold_logprobs=gold_lp.astype(np.float16),
                         ce=1.0, n_chars=10, n_bytes=10, seq_len=len(tc.input_ids), truncated=False), texts


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dirs):
    from transformers import AutoTokenizer

    pt = AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama3"]))
    pt.eos_token = "<|eot_id|>"
    return pt, AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama2"]))


def test_span_translation_exact_numbers(tokenizers):
    pt, st = tokenizers
    p_rec, p_texts = record(pt, L3, {})
    s_rec, s_texts = record(st, INST, {
        " Hello": [("▁Hello", 0.6), ("▁Sure", 0.3), ("▁y", 0.1)],
        " x": [("▁x", 0.7), ("▁y", 0.3)],
        " ": [("▁", 0.9), ("▁y", 0.1)],
        "1": [("1", 0.5), ("7", 0.5)],  # an earlier piece of `18`: its alternative `7` is left out
        "8": [("8", 0.6), ("7", 0.4)],  # the last piece: `18` and `17`, times p(`1`) = 0.5
        ".": [(".", 1.0)],
        "</s>": [("</s>", 0.9), ("▁y", 0.1)]})
    assert p_texts == ["Hello", " x", " ", "18", ".", "<|eot_id|>"]
    assert s_texts == [" Hello", " x", " ", "1", "8", ".", " ", "</s>"]
    vmap = np.full(len(st), -1, np.int64)
    vmap[st.convert_tokens_to_ids("</s>")] = pt.convert_tokens_to_ids("<|eot_id|>")
    vmap[st.convert_tokens_to_ids("▁y")] = pt.convert_tokens_to_ids("Ġy")
    eos = ("<|eot_id|>", "</s>")
    pair = pair_positions(reply_keys(p_rec.text, p_rec.spans, p_rec.assistant_spans, eos[0]),
                          reply_keys(s_rec.text, s_rec.spans, s_rec.assistant_spans, eos[1]))
    chars = token_chars(p_rec.text, p_rec.spans, p_rec.assistant_spans, eos[0])
    view = SpanTranslator(PivotProjector(pt), TokenText(st), eos).view(p_rec, s_rec, pair, chars, vmap, 4)
    # (stored log-probs are float16: 3 decimals)
    got = [{pt.convert_ids_to_tokens(int(a)): round(math.exp(b), 3) for a, b in zip(i, l) if a >= 0}
           for i, l in zip(view.ids, view.logprobs)]
    assert got == [
        {"Hello": 0.6, "Sure": 0.3, "y": 0.1},  # the template's space before the reply is dropped
        {"Ġx": 0.7, "Ġy": 0.3},
        {"Ġ": 0.9, "Ġy": 0.1},
        {"18": 0.3, "17": 0.2},  # 0.5·0.6 and 0.5·0.4
        {".": 1.0},
        {"<|eot_id|>": 0.9, "Ġy": 0.1},  # end of turn: through the vocabulary map
    ]
    assert view.aligned.all()
    # per-token CE of the source = −log p(pivot gold text) per character
    assert view.token_ce[3] == pytest.approx(-math.log(0.3) / 2, rel=1e-3)
    assert view.token_ce[0] == pytest.approx(-math.log(0.6) / 5, rel=1e-3)


def test_projector_exact_then_first_token(tokenizers):
    pt, _ = tokenizers
    proj = PivotProjector(pt)
    assert proj(" equals") == pt.convert_tokens_to_ids("Ġequals")  # a whole pivot token
    first = pt(" equalsxyzzy", add_special_tokens=False)["input_ids"][0]
    assert proj(" equalsxyzzy") == first  # longer text: the pivot's first token of it
    assert proj("") == -1
    # a partial UTF-8 character (a lone byte) lands on the pivot's byte token for that byte
    byte_e2 = next(i for i in range(len(pt)) if proj.text.bytes_of(i) == b"\xe2")
    assert proj("\udce2") == byte_e2
