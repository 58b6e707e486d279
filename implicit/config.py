"""Training settings of implicit fusion: SFT on the best answers, DPO on same-source pairs, WRPO.

Defaults are the published ones for a Llama-3.1-8B-Instruct target: FuseChat-3.0's SFT (3 epochs,
lr 5e-6) and length-normalised DPO (1 epoch, β 10, lr 8e-7), both cosine with warm-up ratio 0.1
and max length 2048, and WRPO's (β 0.01, α 0.1, lr 3e-7). Global batch 128 = batch_size ×
grad_accum × processes (set them for your GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import field


@dataclass
class TrainConfig:
    """Optimiser, precision, LoRA and checkpointing of one training phase."""

    lr: float = field(5e-6, help="peak learning rate")
    lr_scheduler: str = field("cosine", help="transformers scheduler name (cosine, linear, constant_with_warmup, ...)")
    warmup: float = field(0.1, help="warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    max_grad_norm: float = field(1.0, help="gradient clipping norm")
    epochs: float = field(3.0, help="passes over the data (ignored when max_steps > 0)")
    max_steps: int = field(-1, help="optimizer steps; > 0 overrides epochs")
    batch_size: int = field(8, help="examples per device per micro-batch")
    grad_accum: int = field(1, help="micro-batches per optimizer step")
    max_length: int = field(2048, help="tokens per sequence (prompt + answer); longer ones are cut at the end")
    lora: bool = field(False, help="train LoRA adapters (peft) instead of all weights; merged into the saved model")
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
                       help="dtype the model is saved in (auto: the input model's own)")

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "save_steps", "save_total_limit", "logging_steps",
                     "lora_r", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("epochs: must be > 0 when max_steps is not set")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets:
            raise ValueError("lora_targets: give at least one module name (or all-linear)")


@dataclass
class SFTTrainConfig(TrainConfig):
    """SFT on the best answer per prompt (TRL `SFTTrainer`, loss on the answer tokens only)."""

    lr: float = field(5e-6, help="peak learning rate (FuseChat-3.0 Llama targets: 5e-6; Qwen, Gemma: 2e-6)")
    epochs: float = field(3.0, help="passes over the SFT rows (FuseChat-3.0: 3; ignored when max_steps > 0)")


@dataclass
class DPOTrainConfig(TrainConfig):
    """DPO on same-source best/worst pairs (TRL `DPOTrainer`, sigmoid loss), reference = the SFT model."""

    lr: float = field(8e-7, help="peak learning rate (FuseChat-3.0 Llama-3.1-8B: 8e-7)")
    epochs: float = field(1.0, help="passes over the pairs (ignored when max_steps > 0)")
    beta: float = field(10.0, help="β of the DPO loss (FuseChat-3.0: 10 length-normalised for Llama, 0.01 plain "
                                   "for Qwen and Gemma)")
    length_normalize: bool = field(True, help="divide each answer's reward by its token count (FuseChat-3.0 for "
                                              "Llama; TRL loss_type sigmoid_norm)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")


@dataclass
class WRPOTrainConfig(TrainConfig):
    """WRPO on (source best, target best, target worst) triples, reference = the SFT model."""

    lr: float = field(3e-7, help="peak learning rate (WRPO Llama-3-8B: 3e-7)")
    epochs: float = field(1.0, help="passes over the triples (ignored when max_steps > 0)")
    beta: float = field(0.01, help="β of the WRPO loss (WRPO: 0.01)")
    alpha_max: float = field(0.1, help="final fusion coefficient α: the weight of the source's answer in the chosen "
                                       "reward, raised linearly from 0 over training (WRPO: 0.1)")
    length_normalize: bool = field(False, help="divide each answer's reward by its token count")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.alpha_max <= 1.0:
            raise ValueError(f"alpha_max: must be in [0, 1], got {self.alpha_max}")
