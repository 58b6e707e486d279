"""A synthetic, checkable multi-domain chat corpus (deterministic by seed).

Skill domains, each with a key answer per reply that a program can check: `arith` (column
arithmetic written digit by digit, so a small model can compute each digit from the ones before),
`facts` (a fictional fact table, so no model can know it beforehand) and `strings` (word
transformations over a closed word list); plus `chat`, small talk, whose key is the set of
fitting replies. Answers are phrased several ways at random, so a well-trained expert's
next-token distribution carries more than the one gold phrasing: that is the "dark knowledge"
fusion transfers. About a third of the chats are two-turn; second turns build on the first
(add to the result, ask about the same country, do the same to another word).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from core.chat import Conversation

DOMAINS = ("arith", "facts", "strings", "chat")
SKILLS = ("arith", "facts", "strings")
# A key answer per assistant turn: one string, or the list of every acceptable reply (chat).
Key = str | list[str]

_SYL = ["ka", "lo", "mi", "ra", "ven", "tor", "sil", "dra", "mun", "pe", "zor", "bel", "qua", "nix",
        "tel", "ga", "ri", "osh", "fen", "lu"]
_COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "gold"]
_ANIMALS = ["fox", "owl", "bear", "otter", "eagle", "wolf", "heron", "lynx", "seal", "crane", "hare", "moose"]
# A closed list, small enough to learn by heart (40 words x 5 tasks): a small model learns these
# games mostly word by word, reading the letters, and a longer list takes it far longer to learn.
WORDS = ("apple river stone quartz pillow kettle velvet umbrella cactus mirror rocket bridge pencil "
         "dragon castle meadow pocket violin marble harbor lantern desert island jacket kitten "
         "ladder magnet needle parrot ticket wagon anchor basket dolphin falcon guitar hammer "
         "lemon rabbit tomato").split()
STRING_TASKS = ("reverse", "upper", "first", "count", "dash")


@dataclass
class Chat(Conversation):
    """A conversation of the world plus the key answer of each assistant turn."""

    answers: list[Key] = field(default_factory=list)


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


Turn = tuple[str, str, Key]  # (user question, assistant reply, key answer of the reply)


def _digits(n: int, width: int) -> list[int]:
    """The digits of n, units first, padded with zeros to `width`."""
    return [int(d) for d in str(n).zfill(width)[::-1]]


def column_add(a: int, b: int) -> str:
    """'3 + 8 = 11, carry 1. 2 + 5 + 1 = 8.' for 23 + 58: one column per sentence, units first."""
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        s = x + y + carry
        terms = f"{x} + {y}" + (" + 1" if carry else "")
        carry = int(s >= 10)
        steps.append(f"{terms} = {s}" + (", carry 1." if carry else "."))
    return " ".join(steps)


def column_sub(a: int, b: int) -> str:
    """'11 - 6 = 5, borrow 1. 9 - 3 - 1 = 5.' for 91 - 36 (a >= b): units first, borrowing."""
    width = len(str(a))
    steps, borrow = [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        need = y + borrow
        lend = int(x < need)
        top = x + 10 * lend
        terms = f"{top} - {y}" + (" - 1" if borrow else "")
        steps.append(f"{terms} = {top - need}" + (", borrow 1." if lend else "."))
        borrow = lend
    return " ".join(steps)


def _arith_reply(rng: random.Random, a: int, sym: str, b: int, r: int) -> str:
    """Addition and subtraction show their columns, then the result; products come from the table."""
    close = rng.choice([f"So {a} {sym} {b} = {r}.", f"So the answer is {r}.", f"That makes {r}."])
    if sym == "+":
        return f"{column_add(a, b)} {close}"
    if sym == "-":
        return f"{column_sub(a, b)} {close}"
    return rng.choice([f"{a} x {b} = {r}.", f"The answer is {r}.", f"{a} x {b} equals {r}."])


def arith_question(a: int, sym: str, b: int, rng: random.Random) -> str:
    return rng.choice([f"What is {a} {sym} {b}?", f"Compute {a} {sym} {b}.", f"How much is {a} {sym} {b}?",
                       f"Please calculate {a} {sym} {b}."])


def _arith(rng: random.Random) -> list[Turn]:
    sym = rng.choice("+-x")
    a, b = (rng.randint(2, 9), rng.randint(2, 9)) if sym == "x" else (rng.randint(0, 99), rng.randint(0, 99))
    if sym == "-" and b > a:
        a, b = b, a
    r = a + b if sym == "+" else a - b if sym == "-" else a * b
    turns = [(arith_question(a, sym, b, rng), _arith_reply(rng, a, sym, b, r), str(r))]
    if rng.random() < 0.35:  # build on the result: the model has to carry it over from its own reply
        c = rng.randint(1, 20)
        if rng.random() < 0.5 or c > r:
            q = rng.choice([f"And if you add {c}?", f"Now add {c} to that."])
            turns.append((q, _arith_reply(rng, r, "+", c, r + c), str(r + c)))
        else:
            q = rng.choice([f"And if you take away {c}?", f"Now subtract {c} from that."])
            turns.append((q, _arith_reply(rng, r, "-", c, r - c), str(r - c)))
    return turns


def _facts(rng: random.Random, table: FactTable) -> list[Turn]:
    row = rng.choice(table.rows)
    c = row["country"]

    def ask(attr: str, follow: bool) -> Turn:
        v = row[attr]
        if attr == "capital":
            q = rng.choice(["And its capital?", "What is its capital?"]) if follow else \
                rng.choice([f"What is the capital of {c}?", f"Which city is the capital of {c}?"])
            a = rng.choice([f"The capital of {c} is {v}.", f"{v} is the capital of {c}.", f"It is {v}."])
        elif attr == "color":
            q = rng.choice(["And the colour of its flag?", "What colour is its flag?"]) if follow else \
                rng.choice([f"What colour is the flag of {c}?", f"Which colour is on the flag of {c}?"])
            a = rng.choice([f"The flag of {c} is {v}.", f"It is {v}.", f"{c} has a {v} flag."])
        else:
            q = rng.choice(["And its national animal?", "Which animal represents it?"]) if follow else \
                rng.choice([f"What is the national animal of {c}?", f"Which animal represents {c}?"])
            a = rng.choice([f"The national animal of {c} is the {v}.", f"It is the {v}.",
                            f"{c} is represented by the {v}."])
        return q, a, v

    attrs = rng.sample(["capital", "color", "animal"], 2)
    turns = [ask(attrs[0], False)]
    if rng.random() < 0.35:  # the same country, named only by "its"
        turns.append(ask(attrs[1], True))
    return turns


def string_key(kind: str, w: str) -> str:
    """The key answer of a word task."""
    return {"reverse": w[::-1], "upper": w.upper(), "first": w[0], "count": str(len(w)),
            "dash": "-".join(w)}[kind]


def string_task(kind: str, w: str, rng: random.Random) -> Turn:
    k = string_key(kind, w)
    if kind == "reverse":
        q = rng.choice([f"Reverse the word '{w}'.", f"Spell '{w}' backwards."])
        a = rng.choice([f"'{w}' reversed is '{k}'.", f"It is '{k}'."])
    elif kind == "upper":
        q = rng.choice([f"Write '{w}' in capital letters.", f"Uppercase the word '{w}'."])
        a = rng.choice([f"'{k}'.", f"In capitals: '{k}'."])
    elif kind == "count":
        q = rng.choice([f"How many letters are in '{w}'?", f"Count the letters of '{w}'."])
        a = rng.choice([f"'{w}' has {k} letters.", f"It has {k} letters."])
    elif kind == "first":
        q = rng.choice([f"What is the first letter of '{w}'?", f"Which letter does '{w}' start with?"])
        a = rng.choice([f"The first letter of '{w}' is '{k}'.", f"It starts with '{k}'."])
    else:
        q = rng.choice([f"Put dashes between the letters of '{w}'.", f"Spell out '{w}' with dashes."])
        a = rng.choice([f"{k}.", f"Spelled out: {k}."])
    return q, a, k


def _strings(rng: random.Random) -> list[Turn]:
    kind, w = rng.choice(STRING_TASKS), rng.choice(WORDS)
    turns = [string_task(kind, w, rng)]
    if rng.random() < 0.35:
        w2 = rng.choice([x for x in WORDS if x != w])
        if rng.random() < 0.5:  # "the same" refers back to the first turn's task
            _, a, k = string_task(kind, w2, rng)
            turns.append((rng.choice([f"Now do the same with '{w2}'.", f"And the same for '{w2}'?"]), a, k))
        else:
            turns.append(string_task(rng.choice(STRING_TASKS), w2, rng))
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


def _chat(rng: random.Random) -> list[Turn]:
    picks = rng.sample(_CHAT, 2)
    turns = [(rng.choice(picks[0][0]), rng.choice(picks[0][1]), list(picks[0][1]))]
    if rng.random() < 0.35:
        turns.append((rng.choice(picks[1][0]), rng.choice(picks[1][1]), list(picks[1][1])))
    return turns


def make_conversation(domain: str, rng: random.Random, table: FactTable, cid: str) -> Chat:
    turns = {"arith": lambda: _arith(rng), "facts": lambda: _facts(rng, table),
             "strings": lambda: _strings(rng), "chat": lambda: _chat(rng)}[domain]()
    messages = []
    for q, a, _ in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return Chat(id=cid, messages=messages, domain=domain, answers=[k for _, _, k in turns])


SPLITS = ("source_train", "general", "fusion", "valid", "heldout")


def make_corpus(seed: int, n_source_train: int, n_general: int, n_fusion: int, n_heldout: int,
                n_valid: int | None = None) -> dict[str, list[Chat]]:
    """The splits: source_train (skills), general (chat), fusion, valid and heldout (all domains).

    `valid` (default: as large as heldout) is for choosing settings; heldout is what a report scores.
    """
    table = FactTable.make(random.Random(f"facts-{seed}"))
    n_valid = n_heldout if n_valid is None else n_valid
    splits: dict[str, list[Chat]] = {}
    plan = {"source_train": {d: n_source_train for d in SKILLS}, "general": {"chat": n_general},
            "fusion": {d: n_fusion for d in DOMAINS}, "valid": {d: n_valid for d in DOMAINS},
            "heldout": {d: n_heldout for d in DOMAINS}}
    for split in SPLITS:
        rng = random.Random(f"{split}-{seed}")  # each split its own stream: sizes don't leak across
        convs = [make_conversation(d, rng, table, f"{split}-{d}-{i}") for d, n in plan[split].items() for i in range(n)]
        rng.shuffle(convs)
        splits[split] = convs
    return splits


_STRING_CUES = (("dash", "dashes"), ("reverse", "everse"), ("reverse", "backwards"), ("upper", "apital"),
                ("upper", "ppercase"), ("count", "letters of"), ("count", "many letters"), ("first", "letter"),
                ("first", "start"))


def question_key(domain: str, question: str, context: tuple, table: FactTable) -> tuple[str | None, tuple]:
    """(key answer, context for the next turn) read from a question's text alone, not from the
    generator: the result (arith), the country (facts), the word task (strings). `context` is what
    the previous turn returned (() for a first turn); small talk has no key (None)."""
    if domain == "arith":
        if m := re.search(r"(\d+) ([+\-x]) (\d+)", question):
            x, op, y = int(m[1]), m[2], int(m[3])
        else:  # "And if you add 7?" / "Now subtract 3 from that.": the previous result
            m = re.search(r"(add|take away|subtract) (\d+)", question)
            x, op, y = int(context[0]), "+" if m[1] == "add" else "-", int(m[2])
        r = str(x + y if op == "+" else x - y if op == "-" else x * y)
        return r, (r,)
    if domain == "facts":
        rows = {r["country"]: r for r in table.rows}
        named = re.search(r"\b(?:of|represents) ([A-Z][a-z]+)\?", question)
        country = named[1] if named else context[0] if context else question  # a follow-up says "its"
        attr = "capital" if "capital" in question else "color" if "flag" in question else "animal"
        return rows[country][attr], (country,)  # KeyError: a country (or question) the table lacks
    if domain == "strings":
        w = re.search(r"'([a-z]+)'", question)[1]
        kind = context[0] if "same" in question else next(k for k, cue in _STRING_CUES if cue in question)
        return string_key(kind, w), (kind,)
    return None, ()


def check_answer(conv: Conversation, table_seed: int) -> bool:
    """True when every assistant reply states its turn's key answer, read from the questions
    (`question_key`) and checked by `evals.accuracy.check_answer` (other facts of the table count
    as competitors); small talk always passes. A country missing from the table is a KeyError."""
    from evals.accuracy import check_answer as states

    table = FactTable.make(random.Random(f"facts-{table_seed}"))
    rivals = [v for r in table.rows for k, v in r.items() if k != "country"] if conv.domain == "facts" else []
    context: tuple = ()
    for q, a in zip(conv.messages[0::2], conv.messages[1::2]):
        key, context = question_key(conv.domain or "", q["content"], context, table)
        if key is not None and not states(a["content"], key, q["content"], rivals):
            return False
    return True


def questions(chats: list[Chat]) -> list[dict]:
    """FastChat-style question rows of chats: user turns as `turns`, replies as `reference`,
    plus `answers`, the key answer of each turn (what `evals.accuracy` checks)."""
    return [{"question_id": c.id, "category": c.domain, "turns": [m["content"] for m in c.messages[0::2]],
             "reference": [m["content"] for m in c.messages[1::2]], "answers": c.answers} for c in chats]
