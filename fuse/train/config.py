"""The `fuse:` recipe section: how each target T_k is trained from the pivot and source S_k; and the
`fusellm:` section: one target fused from the pivot and several sources in one run (FuseLLM mode),
trained with the same `fuse:` settings.

Defaults are FuseChat's 7B settings (λ 0.9, k 10, T 1.0, lr 5e-6, cosine, warm-up 0.03,
3 epochs); the demo recipe overrides the optimiser settings for its tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import field
from fuse.targets.fusion import FALLBACKS, METHODS, SUMMARIES


@dataclass
class FuseConfig:
    """Fusion targets, loss and training of one target model per source."""

    method: str = field("mince", choices=tuple(METHODS),
                        help="fusion: " + ", ".join(f"{name} ({what})" for name, what in SUMMARIES.items()))
    lam: float = field(0.9, help="λ: weight of CE(gold); the fused-distribution term gets 1−λ (1.0 = pivot-CLM)")
    translate: str = field("span", choices=("span", "vocab"),
                           help="source → pivot distributions: span (follow the source along the gold text and project "
                                "onto pivot tokens) or vocab (FuseChat: map each top-k id through the vocabulary map)")
    temperature: float = field(1.0, help="teacher temperature T: targets are softmax(top-k log-probs / T)")
    top_k: int = field(10, help="top-k entries kept per fused target (at most the stores' k)")
    fallback: str = field("gold", choices=FALLBACKS,
                          help="target where the source has no aligned distribution: the pivot's own, or one-hot gold")
    workers: int = field(0, help="processes that build the training rows (0: one per CPU core); any count gives the same rows")
    lr: float = field(5e-6, help="peak learning rate")
    lr_scheduler: str = field("cosine", help="transformers scheduler name (cosine, linear, constant_with_warmup, ...)")
    warmup: float = field(0.03, help="warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    max_grad_norm: float = field(1.0, help="gradient clipping norm")
    epochs: float = field(3.0, help="passes over the fusion corpus (ignored when max_steps > 0)")
    max_steps: int = field(-1, help="optimizer steps; > 0 overrides epochs")
    batch_size: int = field(8, help="conversations per device per micro-batch")
    grad_accum: int = field(1, help="micro-batches per optimizer step")
    lora: bool = field(False, help="train LoRA adapters (peft) instead of all weights; merged into the saved target")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(32, help="LoRA alpha")
    lora_dropout: float = field(0.05, help="LoRA dropout")
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"],
                                    help="LoRA target modules (peft names; all-linear = every linear but lm_head)")
    bf16: bool | None = field(None, help="bf16 mixed precision (default: on when a bf16-capable GPU is used)")
    gradient_checkpointing: bool | None = field(None, help="gradient checkpointing (default: on when a GPU is used)")
    seed: int = field(42, help="seed for initialisation, data order and dropout")
    save_steps: int = field(100, help="write a resumable checkpoint every N optimizer steps")
    save_total_limit: int = field(2, help="checkpoints kept (older ones are deleted)")
    logging_steps: int = field(10, help="log the loss every N optimizer steps")
    dtype: str = field("auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="dtype the pivot is loaded and the target saved in (auto: the pivot's own)")

    def validate(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam: must be in [0, 1], got {self.lam}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        for name in ("top_k", "batch_size", "grad_accum", "save_steps", "save_total_limit", "logging_steps",
                     "lora_r", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("epochs: must be > 0 when max_steps is not set")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0 (0: one per CPU core), got {self.workers}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")


@dataclass
class FuseLLMConfig:
    """FuseLLM mode: one target from the pivot and K sources at once (MinCE / AvgCE over K + 1
    distributions per sequence), trained with the `fuse:` settings on the pairwise stores and maps."""

    name: str = field("fusellm", help="the target's name: OUT/targets/NAME and its row in the run's tables")
    sources: list[str] = field(default_factory=list,
                               help="names from models.sources fused together (at least two; empty: every source)")

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name: must be a plain folder name, got {self.name!r}")
        dup = sorted({s for s in self.sources if self.sources.count(s) > 1})
        if dup:
            raise ValueError(f"sources: {dup[0]!r} is named twice")
        if len(self.sources) == 1:
            raise ValueError(f"sources: FuseLLM mode needs at least two sources, got only {self.sources[0]!r} "
                             "(one source is pairwise fusion: fuse --source NAME)")
