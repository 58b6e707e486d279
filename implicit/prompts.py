"""The prompts of implicit fusion: what every source answers, N times each.

A prompt is a list of messages ending with a user turn; the answer sampled for it is one
assistant reply. Two input formats, told apart by the first row:

- FastChat `question.jsonl` (`question_id`, `category`, `turns`, optional `reference`): single-turn
  questions only (one reply is sampled per prompt); `reference[0]` is the reference answer.
- chats (`id`, `domain`, `messages` or ShareGPT `conversations`; JSONL or a `datasets` folder):
  the prompt is everything before the last assistant message, which becomes the reference
  (a chat that ends with a user turn is a prompt without a reference); `domain` is the category.

Prompt ids are kept as given (FastChat ids may be integers); `key(id)` is the canonical string
used in dictionaries, so that 1 and "1" stay apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.chat import load_conversations
from core.errors import PivotfuseError
from core.files import read_jsonl


@dataclass
class Prompt:
    """One prompt: `messages` end with a user turn; `reference` answers that turn (or None)."""

    id: Any
    messages: list[dict[str, str]]
    category: str | None = None
    reference: str | None = None

    @property
    def key(self) -> str:
        return key(self.id)

    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]


def key(qid: Any) -> str:
    """Canonical dictionary key of a prompt id (JSON: 1 and "1" differ)."""
    return json.dumps(qid)


def _first_row(path: Path) -> dict | None:
    if not path.is_file():
        return None
    for _, row in read_jsonl(path):
        return row
    return None


def _from_questions(path: Path) -> list[Prompt]:
    prompts = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        for field in ("question_id", "category", "turns"):
            if field not in row:
                raise PivotfuseError(f"{where}: missing field '{field}'")
        qid, turns = row["question_id"], row["turns"]
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise PivotfuseError(f"{where}: 'question_id' must be an integer or a string, got {qid!r}")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise PivotfuseError(f"{where}: 'turns' must be a non-empty list of strings")
        if len(turns) != 1:
            raise PivotfuseError(f"{where}: question {qid!r} has {len(turns)} turns; implicit fusion samples one "
                                 "reply per prompt: give single-turn questions, or chats whose last message is "
                                 "the reply to sample")
        ref = row.get("reference")
        if ref is not None and (not isinstance(ref, list) or not all(isinstance(t, str) for t in ref)):
            raise PivotfuseError(f"{where}: 'reference' must be a list of strings")
        prompts.append(Prompt(qid, [{"role": "user", "content": turns[0]}], row["category"],
                              ref[0] if ref else None))
    return prompts


def _from_chats(path: Path) -> list[Prompt]:
    prompts = []
    for conv in load_conversations(path):
        msgs = conv.messages
        reference = None
        if msgs and msgs[-1]["role"] == "assistant":
            reference, msgs = msgs[-1]["content"], msgs[:-1]
        if not msgs or msgs[-1]["role"] != "user":
            raise PivotfuseError(f"{path}: chat {conv.id!r} has no user turn before its last reply "
                                 "(a prompt must end with a user message)")
        prompts.append(Prompt(conv.id, msgs, conv.domain, reference))
    return prompts


def load_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Prompts from a FastChat question file or a chat corpus (see the module docstring)."""
    p = Path(path)
    if not p.exists():
        raise PivotfuseError(f"{p}: prompts file not found")
    first = _first_row(p)
    prompts = _from_questions(p) if first is not None and "turns" in first else _from_chats(p)
    seen: set[str] = set()
    for q in prompts:
        if q.key in seen:
            raise PivotfuseError(f"{p}: duplicate prompt id {q.id!r}")
        seen.add(q.key)
    if not prompts:
        raise PivotfuseError(f"{p}: no prompts")
    return prompts[:limit] if limit is not None else prompts
