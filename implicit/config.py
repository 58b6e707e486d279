"""Settings of implicit fusion: chat backends, sampling and scoring (`BackendConfig`, `SampleConfig`,
`ScoreConfig`), and training: SFT on the best answers, DPO on same-source pairs, WRPO.

Defaults are the published ones for a Llama-3.1-8B-Instruct target: FuseChat-3.0's SFT (3 epochs,
lr 5e-6) and length-normalised DPO (1 epoch, β 10, lr 8e-7), both cosine with warm-up ratio 0.1
and max length 2048, and WRPO's (β 0.01, α 0.1, lr 3e-7). Global batch 128 = batch_size ×
grad_accum × processes (set them for your GPUs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from core.config import field
from implicit.verify import CHECKERS

DTYPES = ("auto", "bfloat16", "float16", "float32")
SCORERS = ("reward_model", "judge", "verifier")


@dataclass
class BackendConfig:
    """Settings of a chat backend: local generation and endpoint requests."""

    batch_size: int = field(8, help="sequences per forward/generate call for local models")
    dtype: str = field("auto", choices=DTYPES, help="dtype for local models")
    device_map: str | None = field("auto", help="accelerate device_map for local models ('auto' = all visible GPUs, "
                                                "CPU when none)")
    base_url: str | None = field(None, help="default base URL for openai: specs without @URL (else $OPENAI_BASE_URL, "
                                            "else https://api.openai.com/v1)")
    api_key_env: str = field("OPENAI_API_KEY", help="environment variable holding the endpoint's API key "
                                                    "(unset = no key sent)")
    concurrency: int = field(4, help="parallel requests to an endpoint (at most)")
    retries: int = field(6, help="tries per endpoint request before giving up (connection errors, 429, 5xx)")
    backoff: float = field(2.0, help="first retry wait in seconds, doubled after each failed try (capped at 60)")
    timeout: float = field(600.0, help="seconds to wait for one endpoint response")
    chunk_prompts: int = field(16, help="prompts per resumable unit: handled together (batched locally, "
                                        "`concurrency` requests at a time on an endpoint) and appended together")

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency", "retries", "chunk_prompts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.backoff < 0:
            raise ValueError(f"backoff: must be >= 0, got {self.backoff}")
        if self.timeout <= 0:
            raise ValueError(f"timeout: must be > 0, got {self.timeout}")


@dataclass
class SampleConfig(BackendConfig):
    """How each source answers the prompts (FuseChat-3.0: 5 samples, 8 for code; temperature 0.8, top-p 0.95)."""

    n: int = field(5, help="answers sampled per prompt")
    n_by_category: dict[str, int] = field(default_factory=dict, help="answers per prompt for some categories "
                                                                     "(FuseChat-3.0: {code: 8})")
    temperature: float = field(0.8, help="sampling temperature (0 = greedy: then n must be 1)")
    top_p: float = field(0.95, help="nucleus sampling: keep the smallest token set with this much probability")
    max_new_tokens: int = field(1024, help="answer length limit in tokens")
    seed: int = field(0, help="base seed: each chunk of prompts gets its own seed derived from it")
    system_prompt: str | None = field(None, help="system message put before each prompt (default: none)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n <= 0:
            raise ValueError(f"n: must be > 0, got {self.n}")
        for cat, n in self.n_by_category.items():
            if n <= 0:
                raise ValueError(f"n_by_category.{cat}: must be > 0, got {n}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.temperature <= 1e-4 and max([self.n, *self.n_by_category.values()]) > 1:
            raise ValueError("temperature: several answers per prompt need temperature > 0 "
                             "(greedy answers would all be the same)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens: must be > 0, got {self.max_new_tokens}")


def with_overrides(cfg: SampleConfig, **values: Any) -> SampleConfig:
    """`cfg` with some fields replaced (None = keep), checked again: per-source sampling settings."""
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if v is not None})


@dataclass
class ScoreConfig(BackendConfig):
    """Which scorer rewards the answers, and its settings."""

    scorer: str = field("reward_model", choices=SCORERS,
                        help="reward_model (HF sequence-classification folder), judge (LLM, FastChat single-answer "
                             "grading) or verifier (exact check of the answer)")
    reward_model: str | None = field(None, help="reward model: [NAME=]FOLDER (FuseChat-3.0: ArmoRM-Llama3-8B-v0.1)")
    judge: str | None = field(None, help="judge: [NAME=]FOLDER or [NAME=]openai:MODEL[@BASE_URL]")
    judge_prompts: str | None = field(None, help="FastChat judge_prompts.jsonl; default: pivotfuse's own prompts "
                                                 "with the same semantics")
    judge_max_tokens: int = field(2048, help="judgment length limit (FastChat: 2048)")
    checker: str = field("world", choices=tuple(CHECKERS), help="verifier: which checker (implicit/verify.py)")
    world_seed: int = field(0, help="verifier 'world': the seed of the demo world (its fact table)")
    max_length: int = field(4096, help="reward model: tokens per chat (longer ones are cut at the end, and counted)")
    label_index: int = field(0, help="reward model: which output of the head is the reward (models that return "
                                     "a 'score' use it instead)")
    trust_remote_code: bool = field(False, help="reward model: run the model folder's own code (ArmoRM needs it)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scorer == "reward_model" and not self.reward_model:
            raise ValueError("reward_model: the reward_model scorer needs a reward model folder")
        if self.scorer == "judge" and not self.judge:
            raise ValueError("judge: the judge scorer needs a judge (folder or openai:MODEL[@URL])")
        for name in ("judge_max_tokens", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.label_index < 0:
            raise ValueError(f"label_index: must be >= 0, got {self.label_index}")


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
