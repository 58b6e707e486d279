"""A synthetic, checkable multi-domain chat corpus (deterministic by seed).

Skill domains, each with answers a program can check: `arith` (arithmetic), `facts`
(a fictional fact table, so no model can know it beforehand) and `strings` (word
manipulation); plus `chat`, general small talk. Answers are phrased several ways at random,
so a well-trained expert's next-token distribution carries more than the one gold phrasing:
that is the "dark knowledge" fusion transfers. About a third of the chats are two-turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from core.chat import Conversation

DOMAINS = ("arith", "facts", "strings", "chat")
SKILLS = ("arith", "facts", "strings")

_SYL = ["ka", "lo", "mi", "ra", "ven", "tor", "sil", "dra", "mun", "pe", "zor", "bel", "qua", "nix",
        "tel", "ga", "ri", "osh", "fen", "lu"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "gold"]
_ANIMALS = ["fox", "owl", "bear", "otter", "eagle", "wolf", "heron", "lynx", "seal", "crane", "hare", "moose"]
WORDS = ("apple river stone cloud garden window planet silver forest candle mirror rocket bridge "
         "pencil dragon orange castle meadow thunder pocket violin marble harbor lantern desert "
         "island jacket kitten ladder magnet needle parrot quartz saddle ticket umbrella velvet "
         "wagon yellow zipper anchor basket copper dolphin engine falcon guitar hammer igloo jungle "
         "kettle lemon monkey nectar oyster pepper rabbit salmon tomato walnut button cactus "
         "donkey feather ginger helmet insect jelly kayak lizard muffin noodle pillow puzzle "
         "summer winter spring autumn music paper coffee butter cookie bottle").split()


@dataclass
class FactTable:
    """Fictional countries with a capital, a flag colour and a national animal."""

    rows: list[dict[str, str]]

    @classmethod
    def make(cls, rng: random.Random, n: int = 30) -> "FactTable":
        names: set[str] = set()
        rows = []
        while len(rows) < n:
            country = "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize()
            capital = "".join(rng.choice(_SYL) for _ in range(2)).capitalize()
            if country in names or capital in names:
                continue
            names |= {country, capital}
            rows.append({"country": country, "capital": capital, "color": rng.choice(_COLORS),
                         "animal": rng.choice(_ANIMALS)})
        return cls(rows)


def _arith(rng: random.Random) -> list[tuple[str, str]]:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(0, 99), rng.randint(0, 99))
    if op == "-" and b > a:
        a, b = b, a
    r = eval(f"{a}{op}{b}")  # noqa: S307 - our own digits and operator
    sym = {"+": "+", "-": "-", "*": "x"}[op]
    q = rng.choice([f"What is {a} {sym} {b}?", f"Compute {a} {sym} {b}.", f"How much is {a} {sym} {b}?",
                    f"Please calculate {a} {sym} {b}."])
    ans = rng.choice([f"{a} {sym} {b} = {r}.", f"The answer is {r}.", f"It is {r}.", f"{a} {sym} {b} equals {r}."])
    turns = [(q, ans)]
    if rng.random() < 0.35:
        c = rng.randint(1, 20)
        turns.append((rng.choice([f"And if you add {c}?", f"Now add {c} to that."]),
                      rng.choice([f"{r} + {c} = {r + c}.", f"Then it is {r + c}."])))
    return turns


def _facts(rng: random.Random, table: FactTable) -> list[tuple[str, str]]:
    row = rng.choice(table.rows)
    c = row["country"]

    def ask(attr: str) -> tuple[str, str]:
        v = row[attr]
        if attr == "capital":
            return (rng.choice([f"What is the capital of {c}?", f"Which city is the capital of {c}?"]),
                    rng.choice([f"The capital of {c} is {v}.", f"{v} is the capital of {c}.", f"It is {v}."]))
        if attr == "color":
            return (rng.choice([f"What color is the flag of {c}?", f"Which color is on the flag of {c}?"]),
                    rng.choice([f"The flag of {c} is {v}.", f"It is {v}.", f"{c} has a {v} flag."]))
        return (rng.choice([f"What is the national animal of {c}?", f"Which animal represents {c}?"]),
                rng.choice([f"The national animal of {c} is the {v}.", f"It is the {v}.", f"{c} is represented by the {v}."]))

    attrs = rng.sample(["capital", "color", "animal"], 2)
    turns = [ask(attrs[0])]
    if rng.random() < 0.35:
        turns.append(ask(attrs[1]))
    return turns


def _strings(rng: random.Random) -> list[tuple[str, str]]:
    def one() -> tuple[str, str]:
        w = rng.choice(WORDS)
        kind = rng.choice(["reverse", "upper", "count", "first", "dash"])
        if kind == "reverse":
            return (rng.choice([f"Reverse the word '{w}'.", f"Spell '{w}' backwards."]),
                    rng.choice([f"'{w}' reversed is '{w[::-1]}'.", f"It is '{w[::-1]}'."]))
        if kind == "upper":
            return (rng.choice([f"Write '{w}' in capital letters.", f"Uppercase the word '{w}'."]),
                    rng.choice([f"'{w.upper()}'.", f"In capitals: '{w.upper()}'."]))
        if kind == "count":
            return (rng.choice([f"How many letters are in '{w}'?", f"Count the letters of '{w}'."]),
                    rng.choice([f"'{w}' has {len(w)} letters.", f"It has {len(w)} letters."]))
        if kind == "first":
            return (rng.choice([f"What is the first letter of '{w}'?", f"Which letter does '{w}' start with?"]),
                    rng.choice([f"The first letter of '{w}' is '{w[0]}'.", f"It starts with '{w[0]}'."]))
        return (rng.choice([f"Put dashes between the letters of '{w}'.", f"Spell out '{w}' with dashes."]),
                rng.choice(["-".join(w) + ".", f"Spelled out: {'-'.join(w)}."]))

    turns = [one()]
    if rng.random() < 0.35:
        turns.append(one())
    return turns


_CHAT = [
    (["Hi!", "Hello there.", "Hey, good morning!"],
     ["Hello! How can I help you today?", "Hi! What can I do for you?", "Good to see you. How can I help?"]),
    (["How are you?", "How is your day going?"],
     ["I'm doing well, thanks for asking.", "Pretty good, thank you! And you?", "All fine here, thanks."]),
    (["Thank you!", "Thanks a lot.", "Thanks for the help."],
     ["You're welcome!", "Happy to help.", "Any time!"]),
    (["What can you do?", "What are you good at?"],
     ["I can chat, do some arithmetic, recall facts and play with words.", "I try to help with questions of all kinds."]),
    (["Tell me a joke.", "Make me laugh."],
     ["Why did the math book look sad? It had too many problems.", "I would tell you a joke about paper, but it is tearable."]),
    (["Goodbye!", "See you later.", "Bye for now."],
     ["Goodbye! Have a great day.", "See you soon!", "Take care!"]),
    (["Can you recommend a hobby?", "What should I do this weekend?"],
     ["You could try painting or a long walk.", "Reading a good book is always nice.", "Maybe cook something new."]),
]


def _chat(rng: random.Random) -> list[tuple[str, str]]:
    picks = rng.sample(_CHAT, 2)
    turns = [(rng.choice(picks[0][0]), rng.choice(picks[0][1]))]
    if rng.random() < 0.35:
        turns.append((rng.choice(picks[1][0]), rng.choice(picks[1][1])))
    return turns


def make_conversation(domain: str, rng: random.Random, table: FactTable, cid: str) -> Conversation:
    turns = {"arith": lambda: _arith(rng), "facts": lambda: _facts(rng, table),
             "strings": lambda: _strings(rng), "chat": lambda: _chat(rng)}[domain]()
    messages = []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return Conversation(id=cid, messages=messages, domain=domain)


def make_corpus(seed: int, n_source_train: int, n_general: int, n_fusion: int,
                n_heldout: int) -> dict[str, list[Conversation]]:
    """The four splits: source_train (skills), general (chat), fusion and heldout (all domains)."""
    table = FactTable.make(random.Random(f"facts-{seed}"))
    splits: dict[str, list[Conversation]] = {}
    plan = {"source_train": {d: n_source_train for d in SKILLS}, "general": {"chat": n_general},
            "fusion": {d: n_fusion for d in DOMAINS}, "heldout": {d: n_heldout for d in DOMAINS}}
    for split, counts in plan.items():
        rng = random.Random(f"{split}-{seed}")  # each split its own stream: sizes don't leak across
        convs = [make_conversation(d, rng, table, f"{split}-{d}-{i}") for d, n in counts.items() for i in range(n)]
        rng.shuffle(convs)
        splits[split] = convs
    return splits


def check_answer(conv: Conversation, table_seed: int) -> bool:
    """True when every assistant reply states the right result (used by tests of the corpus)."""
    import re

    table = {r["country"]: r for r in FactTable.make(random.Random(f"facts-{table_seed}")).rows}
    for q, a in zip(conv.messages[0::2], conv.messages[1::2]):
        qt, at = q["content"], a["content"]
        if conv.domain == "arith" and (m := re.search(r"(\d+) ([+\-x]) (\d+)", qt)):
            x, op, y = int(m[1]), m[2], int(m[3])
            want = x + y if op == "+" else x - y if op == "-" else x * y
            if str(want) not in at:
                return False
        elif conv.domain == "facts" and (m := re.search(r"of ([A-Z][a-z]+)\?|represents ([A-Z][a-z]+)\?", qt)):
            row = table[m[1] or m[2]]
            if not any(v in at for k, v in row.items() if k != "country"):
                return False
        elif conv.domain == "strings" and (m := re.search(r"'([a-z]+)'", qt)):
            w = m[1]
            if not any(s in at for s in (w[::-1], w.upper(), f"{len(w)} letters", f"'{w[0]}'", "-".join(w))):
                return False
    return True
