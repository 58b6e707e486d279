"""The `align:` recipe section: how each source is aligned onto the pivot (`fuse.align.build`)."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import field


@dataclass
class AlignConfig:
    """Options of the token/vocabulary alignment (the recipe's `align:` section)."""

    max_length: int | None = field(None, help="truncate each tokenized conversation to this many tokens")
    limit: int | None = field(None, help="use only the first N conversations of the corpus")
    halo: int = field(1, help="exact-DP windows reach this many exact shared tokens beyond each disagreement")
    theta: int = field(1, help="windows also grow over shared tokens within this edit distance of a neighbour")
    checkpoint_every: int = field(500, help="save progress every N conversations (an interrupted run resumes)")
    workers: int = field(0, help="processes that align the corpus (0: one per CPU core); any count gives the same map")

    def validate(self) -> None:
        for name in ("max_length", "limit"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}: must be > 0, got {v}")
        if self.halo < 0:
            raise ValueError(f"halo: must be >= 0, got {self.halo}")
        if self.theta < -1:
            raise ValueError(f"theta: must be >= -1 (-1: off), got {self.theta}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0 (0: one per CPU core), got {self.workers}")
        if self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every: must be > 0, got {self.checkpoint_every}")
