"""Sampling: N answers per prompt from one source model, under the source's own chat template.

The model is a local HF folder (batched `generate`, temperature / top-p, seeded) or any
OpenAI-compatible endpoint (at most `concurrency` requests at a time), both through the eval
backends. Output, FastChat's answer format with N choices: `OUT/model_answer/<model>.jsonl`, one
row per prompt: `question_id`, `answer_id`, `model_id`, `choices: [{index, turns: [reply]}]`, `tstamp`.

Resume: the prompts are cut into fixed chunks of `chunk_prompts` (in the prompts' order) and each
chunk is generated as one unit, with its own seed (from `seed`, the model name and the chunk's
first prompt) and appended in one write. A rerun regenerates only chunks with a prompt missing,
with the same seed and the same batch, so an interrupted run resumed gives the same file as an
uninterrupted one. `answer_id` is a hash of the answers, so scores can tell stale answers.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evals.mtbench import append_rows
from implicit.backend import open_backend
from implicit.config import SampleConfig
from implicit.files import answer_path, answer_rows, check_answer_row, check_name, check_settings, finish
from implicit.prompts import Prompt, key


def samples_for(prompt: Prompt, cfg: SampleConfig) -> int:
    return cfg.n_by_category.get(prompt.category or "", cfg.n)


def chunk_seed(seed: int, model: str, first_prompt: str) -> int:
    """The seed of one chunk: stable across reruns and independent of which chunks are done."""
    digest = hashlib.sha256(f"{seed}\0{model}\0{first_prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def answer_id(model: str, qid: Any, replies: list[str]) -> str:
    """Content hash of one answer row (FastChat uses a random id; ours lets scores spot stale answers)."""
    return hashlib.sha256(json.dumps([model, qid, replies], ensure_ascii=False).encode()).hexdigest()[:22]


def conversation(prompt: Prompt, cfg: SampleConfig) -> list[dict[str, str]]:
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return system + [dict(m) for m in prompt.messages]


def sample_chunk(backend: Any, name: str, chunk: list[Prompt], cfg: SampleConfig) -> list[dict]:
    """Answer rows for one chunk: every prompt repeated `samples_for` times in one batched call."""
    batch, owners = [], []
    for i, p in enumerate(chunk):
        for _ in range(samples_for(p, cfg)):
            batch.append(conversation(p, cfg))
            owners.append(i)
    replies = backend.chat(batch, cfg.temperature, cfg.max_new_tokens, top_p=cfg.top_p,
                           seed=chunk_seed(cfg.seed, name, chunk[0].key))
    per: list[list[str]] = [[] for _ in chunk]
    for i, reply in zip(owners, replies):
        per[i].append(reply)
    return [{"question_id": p.id, "answer_id": answer_id(name, p.id, texts), "model_id": name,
             "choices": [{"index": j, "turns": [t]} for j, t in enumerate(texts)], "tstamp": time.time()}
            for p, texts in zip(chunk, per)]


def _complete(row: dict, want: int) -> bool:
    choices = row.get("choices")
    return isinstance(choices, list) and len(choices) == want and all(
        isinstance(c.get("turns"), list) and len(c["turns"]) == 1 for c in choices)


def sample_answers(prompts: list[Prompt], model: Any, out: str | Path, cfg: SampleConfig,
                   chat_template: str | None = None, name: str | None = None) -> Path:
    """Sample `cfg.n` answers to every prompt from `model` into `OUT/model_answer/<name>.jsonl`.

    `model` is a spec (`[NAME=]FOLDER` or `[NAME=]openai:MODEL[@BASE_URL]`, loaded here and freed at
    the end) or a loaded backend (anything with `name` and `chat(batch, temperature, max_tokens,
    top_p=, seed=)`). `name` overrides the backend's name. Rows on disk are kept (resume).
    """
    backend, opened, target = open_backend(model, cfg, chat_template, seed=cfg.seed)
    try:
        name = check_name(name or backend.name, "model")
        path = answer_path(out, name)
        settings = {"model": target, "chat_template": chat_template, "n": cfg.n, "n_by_category": cfg.n_by_category,
                    "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                    "seed": cfg.seed, "system_prompt": cfg.system_prompt, "chunk_prompts": cfg.chunk_prompts}
        check_settings(path.with_name(f"{name}.settings.json"), settings, f"answers of {name}")
        done = {key(r["question_id"]): r for r in answer_rows(path)}
        chunks = [prompts[i:i + cfg.chunk_prompts] for i in range(0, len(prompts), cfg.chunk_prompts)]
        todo = [c for c in chunks if any(p.key not in done or not _complete(done[p.key], samples_for(p, cfg))
                                         for p in c)]
        with tqdm(total=sum(len(c) for c in todo), desc=f"sample {name}", unit="prompt", disable=not todo) as bar:
            for chunk in todo:
                append_rows(path, sample_chunk(backend, name, chunk, cfg))
                bar.update(len(chunk))
        if path.is_file():
            finish(path, [p.key for p in prompts], lambda r: key(r["question_id"]), check_answer_row)
        truncated = getattr(backend, "truncated", 0)
        if truncated:
            print(f"{name}: {truncated} prompts were cut on the left to fit the context")
        return path
    finally:
        if opened:
            backend.close()
