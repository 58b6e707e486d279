"""Settings of the offline demo world (corpus + tiny heterogeneous chat models)."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import field


# `world:NAME` data files (WORLD/data/NAME.jsonl): chats, and the same chats as questions with key answers
WORLD_DATA = ("source_train", "general", "fusion", "valid", "heldout", "valid_questions", "heldout_questions")


@dataclass
class WorldConfig:
    """How the demo world is built; the same values (and code version) give the same world."""

    out: str = field(".cache/world", help="folder the world is built into (reused when its fingerprint matches)")
    seed: int = field(0, help="seed for the corpus and every model")
    n_source_train: int = field(1200, help="source-training conversations per skill domain")
    n_general: int = field(1200, help="general chit-chat conversations (pivot training)")
    n_fusion: int = field(160, help="fusion-corpus conversations per domain")
    n_heldout: int = field(60, help="held-out conversations per domain (what reports score)")
    n_valid: int = field(60, help="validation conversations per domain (for choosing settings; never scored)")
    pivot_skill_share: float = field(0.1, help="share of each skill's source-training chats the pivot also sees "
                                               "(a generalist: weak at every skill, expert at none)")
    expert_chat_share: float = field(0.15, help="general chats an expert also trains on, as a share of its skill chats")
    train_steps: int = field(1000, help="optimizer steps of a world model (each model scales it by its plan)")
    batch_size: int = field(16, help="conversations per training step")
    lr: float = field(5e-3, help="peak learning rate for world models")

    def validate(self) -> None:
        for name in ("n_source_train", "n_general", "n_fusion", "n_heldout", "n_valid", "train_steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        for name in ("pivot_skill_share", "expert_chat_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1]")
        if self.lr <= 0:
            raise ValueError("lr: must be > 0")
