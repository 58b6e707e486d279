"""Token alignment (fuse.align.mined, fuse.align.surface): real tokenizers, equal cost to the plain full DP."""

from __future__ import annotations

import itertools
import random

import editdistance
import numpy as np
import pytest

from fuse.align.mined import align_tokens
from fuse.align.surface import TokenText
from align_helpers import NAMES, real_tokenizers
PAIRS = [(p, s) for p in NAMES for s in NAMES if p != s]
TEXTS = [
    "Hello  world,   three spaces\tand\ttabs\n\nnew paragraph\r\n",
    "Digits: 0 7 42 1234567 3.14159 -12,500.00 and 2024-11-26T18:52:00Z",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # recursion\n",
    "Emoji 😀🤗 👩‍💻 and flags 🇫🇷; zero-width joiner 🧑‍🤝‍🧑!",
    "日本語の文章と中文句子，还有한국어 문장。",
    "Café, naïve, Ünïcödé, façade, smörgåsbord — résumé…",
    "Mixed: Привет мир, مرحبا بالعالم, שלום, नमस्ते, Γειά σου.",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}} <html><b>x</b></html>",
    "aaaa bbbb aaaa bbbb ==== ---- |---|---| 1. 2. 3. ....",
    " leading space and trailing  ",
]
PIECES = ["the", " ", "  ", "\n", "\t", "123", "4567", "x = 1;", "def f(a):\n    return a", "😀", "日本語", "café",
          "naïve", "Ünïcödé", "Привет", "مرحبا", "ab", "ba", "a", " a", "--", "==", "|", "1.", "0"]


def naive_cost(a: list[str], b: list[str]) -> int:
    """FuseLLM's recurrence over the full n×m grid, one editdistance call per cell."""
    n, m = len(a), len(b)
    inf = float("inf")
    D = [[inf] * m for _ in range(n)]
    for i in range(n):
        for j in range(m):
            if i == 0 and j == 0:
                best = 0
            else:
                best = min(D[i - 1][j - 1] if i and j else inf, D[i - 1][j] if i else inf, D[i][j - 1] if j else inf)
            D[i][j] = editdistance.eval(a[i], b[j]) + best
    return int(D[n - 1][m - 1])


def span_pinned_cost(a: list[str], a_off: list, b: list[str], b_off: list) -> int:
    """The issue's first idea: cut both sequences at every common token boundary, DP per piece."""
    cuts_a = {s: k for k, (s, e) in enumerate(a_off)}
    cuts_b = {s: k for k, (s, e) in enumerate(b_off)}
    common = sorted(set(cuts_a) & set(cuts_b) - {a_off[0][0]})
    ia = [0] + [cuts_a[c] for c in common] + [len(a)]
    ib = [0] + [cuts_b[c] for c in common] + [len(b)]
    return sum(naive_cost(a[ia[k]:ia[k + 1]], b[ib[k]:ib[k + 1]]) for k in range(len(ia) - 1))


@pytest.fixture
def toks(tokenizer_dirs):
    return real_tokenizers(tokenizer_dirs)


def encode(tt: TokenText, text: str) -> tuple[list[str], list[tuple[int, int]]]:
    enc = tt.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return tt.in_context(enc["input_ids"], enc["offset_mapping"], text), [tuple(o) for o in enc["offset_mapping"]]


def test_surface_forms(toks):
    """Ġ/▁ markers, byte-level bytes, byte fallback and the prepended SentencePiece space."""
    assert encode(toks["llama3"], "Hello world")[0] == ["Hello", " world"]
    assert encode(toks["llama2"], "Hello world")[0] == ["Hello", " world"]  # ▁Hello at offset 0 is 'Hello'
    assert encode(toks["llama2"], "a\nb")[0] == ["a", "\n", "b"]  # <0x0A>
    assert encode(toks["gemma3"], "a  b")[0] == ["a", "  ", "b"]  # ▁▁
    emoji = "🧑‍🤝‍🧑"
    for name in NAMES:  # whatever the split, the bytes put back together are the text
        ids = toks[name].tokenizer(emoji, add_special_tokens=False)["input_ids"]
        joined = b"".join(toks[name].bytes_of(i) for i in ids).decode()
        assert joined == (" " + emoji if name == "llama2" else emoji)  # Llama-2 prepends ▁ to a text
    # a lone byte of a split character is one code point, so equal splits compare equal
    lone = toks["llama2"].texts(toks["llama2"].tokenizer("🤗", add_special_tokens=False)["input_ids"])
    assert lone == [" ", "\udcf0", "\udc9f", "\udca4", "\udc97"]  # ▁ then <0xF0><0x9F><0xA4><0x97>


def check_groups(al, a_off, b_off):
    """Reported pairs overlap in characters; groups are contiguous, in order, and cover both sides."""
    g = al.groups
    a_off, b_off = np.asarray(a_off), np.asarray(b_off)
    lo = np.maximum(a_off[g[:, 0], 0], b_off[g[:, 1], 0])
    hi = np.minimum(a_off[g[:, 0], 1], b_off[g[:, 1], 1])
    assert (lo < hi).all(), "a reported pair shares no character"
    last = -1
    for t in range(al.n):
        js = al.sources(t)
        if len(js):
            assert (np.diff(js) == 1).all(), f"pivot {t}: partners {js} not contiguous"
            assert js[0] >= last, f"pivot {t}: partners out of order"
            last = js[-1]
    for off, col, k in ((a_off, 0, al.n), (b_off, 1, al.m)):
        covered = np.zeros(k, dtype=bool)
        covered[g[:, col]] = True
        assert covered[off[:, 1] > off[:, 0]].all(), "a token with characters is not aligned"
    # the path itself: from the first cells to the last in unit steps
    p = al.pairs
    assert tuple(p[0]) == (0, 0) and tuple(p[-1]) == (al.n - 1, al.m - 1)
    steps = {tuple(s) for s in np.diff(p, axis=0).tolist()}
    assert steps <= {(1, 0), (0, 1), (1, 1)}


@pytest.mark.parametrize("pivot,source", PAIRS)
def test_real_tokenizers_all_pairs(toks, pivot, source):
    """Every ordered pair on spaces, tabs, digits, code, emoji, CJK, accents and mixed scripts."""
    for text in TEXTS:
        a, a_off = encode(toks[pivot], text)
        b, b_off = encode(toks[source], text)
        al = align_tokens(a, b, a_off, b_off)
        assert al.cost == naive_cost(a, b), text
        check_groups(al, a_off, b_off)
        one = al.one_to_one
        assert (one[al.exact] >= 0).all(), "an exact shared token is not reported 1:1"
        assert all(a[t] == b[one[t]] for t in np.flatnonzero(al.exact))


def test_random_texts_equal_cost(toks):
    """Random texts, all pairs: the fast path's total cost is the full DP's."""
    rng = random.Random(0)
    for _ in range(25):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(2, 14)))
        enc = {n: encode(toks[n], text) for n in NAMES}
        for p, s in PAIRS:
            (a, a_off), (b, b_off) = enc[p], enc[s]
            assert align_tokens(a, b, a_off, b_off).cost == naive_cost(a, b), (text, p, s)


def test_synthetic_repetitive_equal_cost():
    """Random segmentations of texts over 2-3 letters (the hardest case: every token repeats)."""
    rng = random.Random(1)
    for _ in range(400):
        text = "".join(rng.choice("abc"[:rng.choice((2, 3))]) for _ in range(rng.randint(2, 16)))
        segs = []
        for _side in range(2):
            cut = [0] + sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) + [len(text)]
            segs.append(([text[x:y] for x, y in zip(cut, cut[1:])], list(zip(cut, cut[1:]))))
        (a, a_off), (b, b_off) = segs
        assert align_tokens(a, b, a_off, b_off).cost == naive_cost(a, b), (a, b)


def test_span_pinning_loses_optimum(toks):
    """Pinning every common boundary (one DP per disagreeing span) loses the optimum on real text:
    the DP lets the neighbouring exact token absorb '_' (' full' + '_' | 'binary'). Kept as a test;
    align_tokens pins exact shared *tokens* instead and matches the full DP."""
    text = "def full_binary_trees(n):"
    a, a_off = encode(toks["llama3"], text)
    b, b_off = encode(toks["gemma3"], text)
    full = naive_cost(a, b)
    assert span_pinned_cost(a, a_off, b, b_off) > full
    assert align_tokens(a, b, a_off, b_off).cost == full


def test_token_pinning_loses_optimum_window_fallback(toks):
    """Pinning every exact shared token can also lose (repeated digit groups: the optimum steps
    around an exact token); the exact-DP window around the disagreement finds it."""
    text = "abnaïve123123"
    a, a_off = encode(toks["llama3"], text)
    b, b_off = encode(toks["qwen3"], text)
    full = naive_cost(a, b)
    assert align_tokens(a, b, a_off, b_off, halo=0, theta=-1).cost > full  # pinned tokens only
    assert align_tokens(a, b, a_off, b_off).cost == full
    # synthetic: the optimum bypasses the exact 'b'|'b' to pair 'a' with the repeated 'a's
    a, b = ["a", "b", "aab"], ["a", "b", "a", "a", "b"]
    a_off, b_off = [(0, 1), (1, 2), (2, 5)], [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert align_tokens(a, b, a_off, b_off, halo=0, theta=-1).cost == 4 > naive_cost(a, b) == 3
    assert align_tokens(a, b, a_off, b_off).cost == 3


def test_tie_break_and_edges():
    # equal costs: the back-trace prefers the diagonal, then the step that repeats the source token
    assert align_tokens(["x", "x"], ["x", "y"], halo=None).pairs.tolist() == [[0, 0], [1, 1]]
    assert align_tokens(["a", "b"], ["ab"], halo=None).pairs.tolist() == [[0, 0], [1, 0]]
    assert align_tokens(["ab"], ["a", "b"], halo=None).pairs.tolist() == [[0, 0], [0, 1]]
    empty = align_tokens([], ["a"], [], [(0, 1)])
    assert empty.cost == 0 and empty.pairs.shape == (0, 2) and empty.one_to_one.shape == (0,)
    # without offsets the full DP runs and equals the plain one
    rng = random.Random(3)
    words = ["a", "ab", "b", " c", "abc", ""]
    for _ in range(30):
        a = [rng.choice(words) for _ in range(rng.randint(1, 8))]
        b = [rng.choice(words) for _ in range(rng.randint(1, 8))]
        assert align_tokens(a, b).cost == naive_cost(a, b)


def test_cheap_paths_agree_with_full_dp_on_long_text(toks):
    """A longer real text (MT-Bench-like prose, code and numbers) for the two most different pairs."""
    text = " ".join(TEXTS) * 2
    for p, s in (("llama2", "llama3"), ("gemma3", "llama2")):
        a, a_off = encode(toks[p], text)
        b, b_off = encode(toks[s], text)
        assert align_tokens(a, b, a_off, b_off).cost == naive_cost(a, b)


def test_pairs_list_is_complete():
    assert len(PAIRS) == 12 and len(set(itertools.permutations(NAMES, 2))) == 12


def test_chat_alignment_by_reply(toks):
    """Two renderings of one chat (different templates): reply tokens are aligned inside their
    reply, template tokens are not, end-of-turn tokens pair up."""
    from core.chat import render_chat, tokenize_chat
    from fuse.align.chat import ChatTokens, align_chat
    from world.tokenizers import LLAMA2

    msgs = [{"role": "user", "content": "Add 1234 and 5678, please."},
            {"role": "assistant", "content": "1234 + 5678 = 6912.\n\tDone — café 😀 日本語."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome!"}]

    def view(name: str) -> ChatTokens:
        tok = toks[name].tokenizer
        r = render_chat(tok, msgs, None if tok.chat_template else LLAMA2)
        return ChatTokens.from_tokenized(r, tokenize_chat(tok, r))

    for p, s, eot in (("qwen3", "gemma3", 2), ("llama2", "qwen3", 2), ("gemma3", "llama2", 2)):
        pv, sv = view(p), view(s)
        al = align_chat(pv, sv, toks[p], toks[s])
        assert al.end_of_turn == eot
        for t in range(al.n):
            partners = al.sources(t)
            if al.turn[t] < 0:
                assert not len(partners), (p, s, t)  # template-only token
                continue
            r = al.turn[t]
            (ps, pe), (ss, se) = pv.assistant_spans[r], sv.assistant_spans[r]
            assert len(partners)
            if int(pv.ids[t]) in toks[p].special_ids:  # the end-of-turn token: paired with the other's
                assert len(partners) == 1 and int(sv.ids[partners[0]]) in toks[s].special_ids
                continue
            for j in partners.tolist():  # same reply, overlapping in reply coordinates
                a0, a1 = pv.offsets[t] - ps
                b0, b1 = sv.offsets[j] - ss
                assert sv.offsets[j][1] > ss and sv.offsets[j][0] < se  # inside (or straddling) reply r
                assert max(a0, b0) < min(a1, b1)
        texts = {t: toks[p].text(int(pv.ids[t])) for t in range(al.n)}
        assert any(texts[t] == "!" and al.exact[t] for t in texts)  # shared tokens are exact
