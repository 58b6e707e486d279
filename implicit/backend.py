"""How sampling and LLM-judge scoring reach a model: the eval backends (`evals.backends`), a local
HF folder or an OpenAI-compatible endpoint, configured by the fields shared by `sample` and `score`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evals.backends import load_backend, parse_spec
from evals.config import EvalConfig
from implicit.config import BackendConfig

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
