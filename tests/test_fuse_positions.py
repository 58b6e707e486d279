"""Pairing pivot and source positions on shared character boundaries, on real tokenizers/templates."""

from __future__ import annotations

import random

import numpy as np
import pytest

from core.chat import render_chat, tokenize_chat
from fuse.targets.pairing import END, pair_positions, reply_keys, token_chars

L3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
      "{% endfor %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
MSGS = [{"role": "user", "content": "What is 6 x 3?"}, {"role": "assistant", "content": "6 x 3 equals 18."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, naïve world!"}]


def scored(tokenizer_dirs, name, template, messages, eos=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dirs[name]))
    if eos:
        tok.eos_token = eos
    r = render_chat(tok, messages, template)
    tc = tokenize_chat(tok, r)
    pos = [i for i, a in enumerate(tc.assistant) if a and i >= 1]
    spans = np.array([tc.offsets[i] for i in pos]).reshape(-1, 2)
    return r.text, spans, np.array(r.assistant_spans), tok.eos_token


def test_pairs_on_llama3_chat_vs_llama2_inst(tokenizer_dirs):
    p = scored(tokenizer_dirs, "llama3", L3, MSGS, eos="<|eot_id|>")
    s = scored(tokenizer_dirs, "llama2", INST, MSGS)
    piv = [p[0][a:b] for a, b in p[1]]
    src = [s[0][a:b] for a, b in s[1]]
    assert piv == ["6", " x", " ", "3", " equals", " ", "18", ".", "<|eot_id|>",
                   "Hello", ",", " naï", "ve", " world", "!", "<|eot_id|>"]
    assert src == ["6", " x", " ", "3", " equals", " ", "1", "8", ".", " ", "</s>",
                   " Hello", ",", " na", "ï", "ve", " world", "!", " ", "</s>"]
    pair = pair_positions(reply_keys(*p), reply_keys(*s))
    got = [(piv[j], src[i]) for j, i in enumerate(pair.tolist())]
    # '18' starts where '1' does (the source then predicts '8' from a context the pivot never has);
    # the end-of-turn tokens pair although the source puts a space token before its '</s>';
    # the reply's first token pairs with ' Hello' (the template's space before the reply).
    assert got == [("6", "6"), (" x", " x"), (" ", " "), ("3", "3"), (" equals", " equals"), (" ", " "),
                   ("18", "1"), (".", "."), ("<|eot_id|>", "</s>"), ("Hello", " Hello"), (",", ","),
                   (" naï", " na"), ("ve", "ve"), (" world", " world"), ("!", "!"), ("<|eot_id|>", "</s>")]


def test_keys_mark_end_of_turn_and_skip_split_characters(tokenizer_dirs):
    from core.chat import end_of_turn_tokens

    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a 🦜 b"}]
    # Llama-3 as shipped: EOS is <|end_of_text|>, the turn ends with <|eot_id|>
    text, spans, a_spans, eos = scored(tokenizer_dirs, "llama3", L3, msgs)
    assert eos == "<|end_of_text|>"
    from transformers import AutoTokenizer

    eos = end_of_turn_tokens(AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama3"])))
    keys = reply_keys(text, spans, a_spans, eos)
    pieces = [text[a:b] for a, b in spans]
    assert keys[-1] == (0, END) and pieces[-1] == "<|eot_id|>"
    # the emoji is one character split over byte-level tokens: only its first piece starts cleanly
    at = text.index("🦜")
    pieces_of_emoji = [k for k, (a, b) in zip(keys, spans.tolist()) if a <= at < b and b > a]
    assert len(pieces_of_emoji) > 1 and sum(k is not None for k in pieces_of_emoji) == 1
    chars = token_chars(text, spans, a_spans, eos)
    assert chars[-1] == 1 and chars.sum() >= len("a 🦜 b")


def test_duplicate_keys_use_the_last_token():
    # source: a lone space token then 'Hello', both at reply offset 0; pivot likewise
    out = pair_positions([(0, 0), (0, 0), (0, 5), None], [(0, 0), (0, 0), (0, 5)])
    assert out.tolist() == [-1, 1, 2, -1]


@pytest.mark.parametrize("pair", [("llama3", "llama2"), ("llama2", "qwen3"), ("gemma3", "llama3")])
def test_every_pair_shares_its_boundary_and_none_is_missed(tokenizer_dirs, pair):
    rng = random.Random(0)
    words = ["alpha", "beta", "12345", "naïve", "café", "東京", "😀", "x=1;", "\n", "\t", "  ", "don't", "ß"]
    msgs = []
    for _ in range(3):
        msgs += [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(5))},
                 {"role": "assistant", "content": "".join(rng.choice(words) + rng.choice([" ", "", "\n"])
                                                          for _ in range(12)).strip()}]
    p = scored(tokenizer_dirs, pair[0], L3, msgs, eos="<|eot_id|>" if pair[0] == "llama3" else None) \
        if pair[0] == "llama3" else scored(tokenizer_dirs, pair[0], INST, msgs)
    s = scored(tokenizer_dirs, pair[1], INST, msgs) if pair[1] != "llama3" else \
        scored(tokenizer_dirs, pair[1], L3, msgs, eos="<|eot_id|>")
    kp, ks = reply_keys(*p), reply_keys(*s)
    out = pair_positions(kp, ks)
    for j, i in enumerate(out.tolist()):
        if i >= 0:
            assert kp[j] == ks[i]  # same reply, same character offset (or both end-of-turn)
            if kp[j][1] not in (END, 0):  # both models have read the same reply text before the token
                r, off = kp[j]
                pc = p[0][p[2][r][0]:p[2][r][0] + off]
                sc = s[0][s[2][r][0]:s[2][r][0] + off]
                assert pc == sc
    last_p = {k: j for j, k in enumerate(kp) if k is not None}
    src_keys = {k for k in ks if k is not None}
    for k, j in last_p.items():
        assert (out[j] >= 0) == (k in src_keys)  # every shared boundary is used
    assert (out >= 0).sum() >= 0.3 * len(kp)
