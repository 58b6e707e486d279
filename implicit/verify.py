"""Verifiers: exact checks of an answer against what the prompt asks, as `checker(prompt, answer) -> bool`.

A verifier scores 1.0 (right) or 0.0 (wrong). Checkers are looked up by name (`ScoreConfig.checker`):

- `world`: the demo world's own check (`world.corpus.check_answer`): the arithmetic result, the
  fact from the world's fact table, the word-game result, stated in the answer; small talk
  (`chat`) always passes, as it does for the corpus. It needs the world's seed (its fact table).
  A general key-answer checker against references will join this table later.
"""

from __future__ import annotations

from typing import Callable

from core.chat import Conversation
from core.errors import PivotfuseError
from implicit.prompts import Prompt

Checker = Callable[[Prompt, str], bool]


def world_checker(world_seed: int) -> Checker:
    """The demo world's checker for prompts of its domains (category = the chat's domain)."""
    from world.corpus import DOMAINS, check_answer

    def check(prompt: Prompt, answer: str) -> bool:
        if prompt.category not in DOMAINS:
            raise PivotfuseError(f"prompt {prompt.id!r}: the world checker knows the domains {list(DOMAINS)}, "
                                 f"not {prompt.category!r}")
        # The context's earlier assistant turns are the corpus's own (right) answers, so the whole
        # chat passes exactly when the sampled reply does.
        messages = [m for m in prompt.messages if m["role"] != "system"]
        conv = Conversation(id=str(prompt.id), messages=messages + [{"role": "assistant", "content": answer}],
                            domain=prompt.category)
        try:
            return check_answer(conv, world_seed)
        except KeyError as e:  # a country the fact table of this seed does not have
            raise PivotfuseError(f"prompt {prompt.id!r}: {e} is not in the fact table of the world with seed "
                                 f"{world_seed} (is world_seed the world's seed?)") from None

    return check


CHECKERS: dict[str, Callable[..., Checker]] = {"world": world_checker}


def make_checker(name: str, world_seed: int = 0) -> Checker:
    if name not in CHECKERS:
        raise PivotfuseError(f"checker {name!r}: unknown (known: {', '.join(CHECKERS)})")
    return CHECKERS[name](world_seed)
