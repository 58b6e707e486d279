"""Build (or reuse) a world from a spec file (`world.spec`): the demo world's corpus, and one
model per entry, each a real transformers architecture at tiny width with a real tokenizer and
chat template, trained briefly so that it is a meaningful teacher.

Layout of OUT (as the demo world's, so `world:NAME` resolves the same way):
    data/{source_train,general,fusion,valid,heldout}.jsonl, data/{valid,heldout}_questions.jsonl
    models/NAME/      HF folder: weights, config, tokenizer with its chat template saved in it
    world.json        fingerprint, per model: architecture, vocabulary, parameters, held-out loss
                      (nats per token against the uniform log V, nats per char) on its own domain (the
                      pivot: all) and per domain, chats its template could not render, training time
                      and peak RSS
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from core.atomic import publish_folder
from core.chat import Conversation, render_chat, write_conversations
from core.errors import PivotfuseError
from core.files import read_json, read_text
from core.fingerprint import digest, source_bytes, tensor_hash
from world import corpus
from world.spec import OWN_TEMPLATE, ModelEntry, WorldSpec, load_spec, tokenizer_folder, training_mix

CODE = ("corpus.py", "train.py", "spec.py", "shapes.py")  # the world code that decides its content


def with_system(splits: dict[str, list[corpus.Chat]], share: float, prompt: str,
                seed: int) -> dict[str, list[Conversation]]:
    """The splits with a system message opening a `share` of the chats of each (seeded per split)."""
    out: dict[str, list[Conversation]] = {}
    for name, convs in splits.items():
        rng = random.Random(f"system-{name}-{seed}")
        out[name] = [Conversation(c.id, ([{"role": "system", "content": prompt}] if rng.random() < share else [])
                                  + c.messages, c.domain) for c in convs]
    return out


def entry_template(entry: ModelEntry, folder: Path) -> str:
    """The chat template of an entry: its file's text, or the tokenizer folder's own."""
    if entry.chat_template != OWN_TEMPLATE:
        return read_text(entry.chat_template)
    from core.loading import load_tokenizer

    return load_tokenizer(folder).chat_template


def make_tokenizer(entry: ModelEntry) -> Any:
    """The entry's tokenizer: the folder's, with its added specials, eos, pad and chat template."""
    from core.loading import load_tokenizer

    folder = tokenizer_folder(entry.tokenizer.folder)
    tok = load_tokenizer(folder, fast=True, name=entry.name)
    t = entry.tokenizer
    if t.add_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(t.add_special_tokens)})
    if t.eos_token:
        tok.eos_token = t.eos_token
    tok.pad_token = t.pad_token or tok.pad_token or tok.unk_token or tok.eos_token
    tok.chat_template = entry_template(entry, folder)
    return tok


def renderable(tok: Any, convs: list[Conversation]) -> tuple[list[Conversation], dict[str, Any]]:
    """The chats the tokenizer's template renders, and the others counted with the first reason."""
    kept, skipped, reason = [], 0, None
    for c in convs:
        try:
            render_chat(tok, c.messages)
        except PivotfuseError as e:
            skipped, reason = skipped + 1, reason or str(e)
            continue
        kept.append(c)
    return kept, {"skipped": skipped, **({"reason": reason} if reason else {})}


def _config(entry: ModelEntry, tok: Any) -> Any:
    import transformers

    ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    return getattr(transformers, entry.config)(**entry.settings, **ids)


def train_model(i: int, spec: WorldSpec, splits: dict[str, list[Conversation]], folder: Path) -> dict:
    """Tokenizer + model + training + held-out loss for model `i` of the spec; saves its HF folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from core.loading import load_tokenizer
    from core.measure import phase
    from evals.loss import chat_losses
    from world.train import train

    torch.set_num_threads(1)  # one model per process: two trainings use two cores fully
    entry = spec.models[i]
    make_tokenizer(entry).save_pretrained(folder)
    tok = load_tokenizer(folder, fast=True)  # train with what users will load: the folder
    torch.manual_seed(spec.seed * 100 + i)
    model = AutoModelForCausalLM.from_config(_config(entry, tok))
    mix, dropped = renderable(tok, training_mix(entry, splits, spec.corpus))
    steps = max(1, round(spec.train.steps * entry.steps))
    with phase("world train", entry.name, vocab=len(tok), steps=steps) as measured:
        losses = train(model, tok, mix, steps=steps, batch_size=spec.train.batch_size, lr=spec.train.lr * entry.lr,
                       seed=spec.seed * 100 + i, max_length=spec.train.max_length)
    model.save_pretrained(folder)
    held = chat_losses(model, tok, splits["heldout"], max_length=spec.train.max_length, batch_size=16,
                       desc=f"held-out {entry.name}")
    per_domain = {}
    for domain in (*corpus.DOMAINS, "all"):
        scored = [h for h, c in zip(held, splits["heldout"]) if "skipped" not in h and domain in (c.domain, "all")]
        nats, tokens, chars = (sum(h[k] for h in scored) for k in ("nats", "tokens", "chars"))
        per_domain[domain] = {"nats_per_token": round(nats / max(tokens, 1), 4),
                              "nats_per_char": round(nats / max(chars, 1), 4)}
    own = per_domain[entry.domain or "all"]  # an expert on its domain, the generalist pivot on all
    cfg = model.config
    return {"name": entry.name, "expert_of": entry.domain or "general chat", "config": entry.config,
            "architecture": cfg.model_type, "tokenizer": entry.tokenizer.folder, "vocab": len(tok),
            "template": entry.chat_template, "params": sum(p.numel() for p in model.parameters()),
            "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)), "train_steps": steps,
            "train_loss_first": round(losses[0], 4), "train_loss_last": round(losses[-1], 4),
            "heldout_nats_per_token": own["nats_per_token"], "uniform_nats_per_token": round(math.log(len(tok)), 4),
            "heldout_nats_per_char": own["nats_per_char"], "heldout_per_domain": per_domain,
            "train_chats_skipped": dropped, "heldout_chats_skipped": sum("skipped" in h for h in held),
            "train_seconds": measured["seconds"], "train_peak_rss_mb": measured["peak_rss_mb"],
            "sha256": tensor_hash(folder)}


def fingerprint(spec: WorldSpec) -> str:
    """The spec, the bytes of every tokenizer file and template it names, and the world's code."""
    here = Path(__file__).parent
    files = []
    for m in spec.models:
        folder = tokenizer_folder(m.tokenizer.folder)
        files.append(sorted((f.name, digest(f.read_bytes())) for f in folder.iterdir() if f.is_file()))
        if m.chat_template != OWN_TEMPLATE:  # a folder's own template is in its files already
            files.append(read_text(m.chat_template))
    return digest(dataclasses.asdict(spec), files, source_bytes(here, CODE))


def build_spec_world(spec_path: str | Path, out: str | Path, progress: bool = True) -> dict:
    """Build the world of `spec_path` into `out` unless one with the same fingerprint is there;
    returns its `world.json`. A lock serialises concurrent builders, as for the demo world."""
    from world.build import check_out

    spec = load_spec(spec_path)
    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fp = fingerprint(spec)
        meta_path = out / "world.json"
        if meta_path.is_file() and read_json(meta_path, "a world table (JSON object)").get("fingerprint") == fp:
            return read_json(meta_path)
        return _build(spec, str(spec_path), fp, out, progress)


def _build(spec: WorldSpec, spec_path: str, fp: str, out: Path, progress: bool) -> dict:
    import torch

    t0 = time.time()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    c = spec.corpus
    chats = corpus.make_corpus(spec.seed, c.n_source_train, c.n_general, c.n_fusion, c.n_heldout, c.n_valid)
    splits = with_system(chats, c.system_share, c.system_prompt, spec.seed)
    for name, convs in splits.items():
        write_conversations(convs, tmp / "data" / f"{name}.jsonl")
    for name in ("valid", "heldout"):  # questions with key answers, from the chats without system text
        rows = corpus.questions(chats[name])
        (tmp / "data" / f"{name}_questions.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    # Largest vocabularies first (their LM heads dominate), so the two cores finish together.
    sizes = {i: _vocab_guess(m) * max(m.steps, 1e-3) for i, m in enumerate(spec.models)}
    order = sorted(sizes, key=lambda i: -sizes[i])
    workers = 1 if torch.cuda.is_available() else max(1, min(len(order), os.cpu_count() or 1))
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {i: pool.submit(train_model, i, spec, splits, tmp / "models" / spec.models[i].name) for i in order}
        rows = {}
        for i in order:
            rows[i] = futures[i].result()
            if progress:
                r = rows[i]
                print(f"world: {r['name']} ({r['config']}, vocab {r['vocab']:,}, {r['params']:,} params): held-out on its domain "
                      f"{r['heldout_nats_per_token']:.3f} nats/token (uniform {r['uniform_nats_per_token']:.2f})",
                      flush=True)
    meta = {"fingerprint": fp, "spec": spec_path, "config": dataclasses.asdict(spec),
            "models": [rows[i] for i in range(len(spec.models))],
            "corpus": {k: len(v) for k, v in splits.items()}, "build_seconds": round(time.time() - t0, 1)}
    (tmp / "world.json").write_text(json.dumps(meta, indent=2))
    publish_folder(tmp, out)
    return meta


def _vocab_guess(entry: ModelEntry) -> int:
    """Vocabulary size of an entry's tokenizer from its tokenizer.json, without loading it."""
    folder = tokenizer_folder(entry.tokenizer.folder)
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
    return len(model.get("vocab", ())) or 1


def format_table(meta: dict) -> str:
    """Markdown: each model's shape, its held-out loss against uniform, skipped chats, training cost."""
    lines = ["| model | expert of | config | vocab | params | tied | template | steps | held-out nats/token (own "
             "domain) | uniform | all domains | chats skipped (train / held-out) | train s | peak RSS MB |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for m in meta["models"]:
        lines.append(f"| {m['name']} | {m['expert_of']} | {m['config']} | {m['vocab']:,} | {m['params']:,} | "
                     f"{'yes' if m['tie_word_embeddings'] else 'no'} | {m['template']} | {m['train_steps']} | "
                     f"{m['heldout_nats_per_token']:.3f} | {m['uniform_nats_per_token']:.2f} | "
                     f"{m['heldout_per_domain']['all']['nats_per_token']:.3f} | {m['train_chats_skipped']['skipped']} / "
                     f"{m['heldout_chats_skipped']} | {m['train_seconds']:.0f} | {m['train_peak_rss_mb']:.0f} |")
    lines.append(f"\nbuilt in {meta['build_seconds']} s; corpus sizes {meta['corpus']}")
    return "\n".join(lines)
