"""Settings of teacher extraction: `ExtractConfig` (the recipe's `extract:` section, shared by every
model of a run) and `ExtractJob` (those settings plus which model, which corpus, which store: one
`pivotfuse extract` call), as `merge.config` separates `MergeConfig` from `MergeJob`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from core.config import field

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ExtractConfig:
    """How a model's top-k next-token log-probs are extracted and stored."""

    top_k: int = field(10, help="next-token candidates kept per scored token")
    batch_size: int = field(8, help="conversations per forward pass (sorted by length to limit padding)")
    max_length: int = field(2048, help="tokens per conversation; longer ones are truncated and counted")
    chat_template: str | None = field(None, help="jinja chat-template file (for models whose tokenizer has none)")
    shard_size: int = field(256, help="conversations per store shard: the unit of resuming and of work per process")
    dtype: str = field("auto", choices=DTYPES,
                       help="weights dtype (auto: bfloat16 on a bf16-capable GPU, else float32)")

    def validate(self) -> None:
        for name in ("top_k", "batch_size", "shard_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.max_length < 2:
            raise ValueError("max_length: must be >= 2")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {list(DTYPES)}, got {self.dtype!r}")


@dataclass
class ExtractJob(ExtractConfig):
    """One extraction: the settings, the model, the corpus and the store to write."""

    model: str | None = field(None, help="HF model folder (weights, tokenizer, chat template)")
    data: str | None = field(None, help="chat corpus: JSONL or a saved datasets folder")
    out: str | None = field(None, help="store folder to write (rerun the same command to resume)")
    # How the work is scheduled, not what is stored: outside the store's fingerprint and the recipe.
    overlap: bool = field(True, help="run host work beside the forward pass: tokenise the next shard and write "
                                     "the last one in background threads, queue the next batch before waiting "
                                     "for this one (--no-overlap: one step after another; the same store "
                                     "byte for byte)")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.overlap, bool):  # Python callers: the CLI and recipes check the type already
            raise ValueError(f"overlap: must be true or false, got {self.overlap!r}")

    @classmethod
    def of(cls, settings: ExtractConfig, **job: str | None) -> "ExtractJob":
        """`settings` with the job's fields (model, data, out; chat_template may be replaced too)."""
        return cls(**{**asdict(settings), **job})
