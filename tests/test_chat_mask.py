"""`core.chat.assistant_mask` (array form) against `token_in_spans` (the per-token rule), token by token."""

from __future__ import annotations

import random

from core.chat import assistant_mask, token_in_spans


def _case(rng: random.Random) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    alphabet = "ab \n\t\u00a0\u3000é漢字😀[/INST]"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    n = len(text)
    cuts = sorted(rng.sample(range(n + 1), min(n + 1, rng.randint(0, 6))))
    spans = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    if rng.random() < 0.2 and n:  # overlapping and empty spans too: the rule allows any
        a = rng.randint(0, n)
        spans += [(a, a), (max(0, a - 3), min(n, a + 5))]
    offsets, pos = [], 0
    while pos < n:  # tokens of 0–4 characters, gaps and zero-width tokens included
        step = rng.randint(0, 4)
        offsets.append((pos, min(n, pos + step)))
        pos += max(step, 1) + (rng.random() < 0.1)
    return text, spans, offsets


def test_mask_equals_rule_on_random_cases() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        text, spans, offsets = _case(rng)
        want = [token_in_spans(s, e, text, spans) for s, e in offsets]
        assert assistant_mask(text, spans, offsets).tolist() == want, (text, spans, offsets)


def test_mask_known_case() -> None:
    text = "[INST] hi [/INST] Hello there </s>"
    spans = [(17, len(text))]  # the reply, from the space after [/INST]
    offsets = [(0, 6), (6, 9), (10, 17), (17, 18), (18, 23), (23, 29), (29, 30), (30, 34)]
    mask = assistant_mask(text, spans, offsets).tolist()
    assert mask == [False, False, False, True, True, True, True, True]
    assert assistant_mask("", [], []).tolist() == []
