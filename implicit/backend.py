"""How sampling and LLM-judge scoring reach a model: the eval backends (`evals.backends`), a local
HF folder or an OpenAI-compatible endpoint, configured by the fields shared by `sample` and `score`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import field
from evals.backends import load_backend, parse_spec
from evals.config import EvalConfig

DTYPES = ("auto", "bfloat16", "float16", "float32")


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


def eval_config(cfg: BackendConfig, **extra: Any) -> EvalConfig:
    """The `EvalConfig` the eval backends read, from our backend fields (+ `extra` eval fields)."""
    return EvalConfig(batch_size=cfg.batch_size, dtype=cfg.dtype, device_map=cfg.device_map, base_url=cfg.base_url,
                      api_key_env=cfg.api_key_env, concurrency=cfg.concurrency, retries=cfg.retries,
                      backoff=cfg.backoff, timeout=cfg.timeout, **extra)


def open_backend(model: Any, cfg: BackendConfig, chat_template: str | None = None,
                 **extra: Any) -> tuple[Any, bool, str]:
    """(backend, opened here, target) for `model`: a spec string `[NAME=]FOLDER` or
    `[NAME=]openai:MODEL[@URL]` (loaded now; the caller closes it), or an object that already has
    `name` and `chat`. `target` says what answers (resolved folder or endpoint model), for manifests."""
    if not isinstance(model, str):
        return model, False, f"object:{getattr(model, 'name', type(model).__name__)}"
    ref = parse_spec(model, cfg.base_url)
    target = f"openai:{ref.target}@{ref.base_url}" if ref.kind == "openai" else str(Path(ref.target).resolve())
    return load_backend(ref, eval_config(cfg, **extra), chat_template), True, target
