"""A small two-turn question set of our own over the demo world's domains.

`arith`, `strings` and `chat` are written here (references computed, not typed); the world's
fact table is fictional and made from its seed, so `facts` questions are taken from the
`facts` chats of a file the world wrote (its held-out split): user turns become the
question's turns, the assistant turns its reference answers.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import PivotfuseError

_ARITH = [(23, "+", 58, 7), (91, "-", 36, 12), (7, "x", 8, 5), (64, "+", 29, 15), (9, "x", 6, 3)]  # the world's ranges
_STRINGS = [("reverse", "lantern", "upper", "harbor"), ("count", "dolphin", "first", "quartz"),
            ("dash", "magnet", "reverse", "pillow"), ("upper", "kettle", "count", "velvet"),
            ("first", "umbrella", "dash", "cactus")]
_CHAT = [("Hello! How are you today?", "Can you suggest something fun to do this evening?"),
         ("Thanks for helping me earlier.", "Could you tell me a short joke?"),
         ("What kinds of things can you help with?", "Which of those do you enjoy most?"),
         ("Good morning!", "What would be a nice hobby to start?"),
         ("I had a long day.", "Any advice for relaxing before bed?")]


def _arith(a: int, op: str, b: int, c: int) -> tuple[list[str], list[str]]:
    r = a + b if op == "+" else a - b if op == "-" else a * b
    return ([f"What is {a} {op} {b}?", f"And if you add {c}?"],
            [f"{a} {op} {b} = {r}.", f"{r} + {c} = {r + c}."])


def _string_task(kind: str, w: str) -> tuple[str, str]:
    if kind == "reverse":
        return f"Reverse the word '{w}'.", f"'{w}' reversed is '{w[::-1]}'."
    if kind == "upper":
        return f"Write '{w}' in capital letters.", f"'{w.upper()}'."
    if kind == "count":
        return f"How many letters are in '{w}'?", f"'{w}' has {len(w)} letters."
    if kind == "first":
        return f"What is the first letter of '{w}'?", f"The first letter of '{w}' is '{w[0]}'."
    return f"Put dashes between the letters of '{w}'.", "-".join(w) + "."


def _facts_from(path: str | Path, n: int) -> list[tuple[list[str], list[str]]]:
    """The first `n` facts chats of a JSONL/datasets file, two-turn ones first."""
    from core.chat import load_conversations

    chats = [c for c in load_conversations(path) if c.domain == "facts"]
    if not chats:
        raise PivotfuseError(f"{path}: no chats with domain 'facts' for the demo questions")
    chats.sort(key=lambda c: len(c.messages) < 4)  # stable: two-turn chats first, file order kept
    out = []
    for c in chats[:n]:
        users = [m["content"] for m in c.messages if m["role"] == "user"]
        replies = [m["content"] for m in c.messages if m["role"] == "assistant"]
        out.append((users[: len(replies)], replies))
    return out


def demo_questions(facts_from: str | Path | None = None, per_domain: int = 5) -> list[dict]:
    """FastChat-format questions (with `reference`), `per_domain` per domain (at most 5)."""
    items: list[tuple[str, list[str], list[str] | None]] = []
    items += [("arith", *_arith(*t)) for t in _ARITH[:per_domain]]
    if facts_from is not None:
        items += [("facts", turns, refs) for turns, refs in _facts_from(facts_from, per_domain)]
    for k1, w1, k2, w2 in _STRINGS[:per_domain]:
        (q1, a1), (q2, a2) = _string_task(k1, w1), _string_task(k2, w2)
        items.append(("strings", [q1, q2], [a1, a2]))
    items += [("chat", list(turns), None) for turns in _CHAT[:per_domain]]
    questions = []
    for i, (category, turns, refs) in enumerate(items, 1):
        q = {"question_id": i, "category": category, "turns": turns}
        if refs is not None:
            q["reference"] = refs
        questions.append(q)
    return questions
