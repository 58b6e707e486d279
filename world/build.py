"""Build (or reuse) the demo world: corpus splits, tokenizers, four trained chat models.

Layout of WORLD (= `WorldConfig.out`):
    data/{source_train,general,fusion,valid,heldout}.jsonl   chats with `id`, `domain`, `messages`
    data/{valid,heldout}_questions.jsonl   the same chats as questions: `turns`, `reference`, key `answers`
    models/{pivot,arith,facts,strings}/    HF folders (safetensors + tokenizer + template)
    answers/model_answer/NAME.jsonl        each model's greedy replies to the held-out questions
    world.json                             fingerprint, model table, held-out losses and accuracy

`valid` is for choosing settings (fusion steps, λ, temperature); `heldout` is what reports score.
A folder whose `world.json` fingerprint matches the settings and the world code is reused.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm import tqdm

from core.assets import asset_root, missing
from core.atomic import publish_folder
from core.chat import write_conversations
from core.errors import PivotfuseError
from core.files import read_json
from core.loading import load_tokenizer
from core.fingerprint import digest, source_bytes, tensor_hash
from world import corpus
from world.config import WorldConfig
from world.models import PLANS, build_model
from world.train import loss_per_char, train


# The code that shapes the world: a change to it rebuilds the world (it is in the fingerprint).
CODE = ("corpus.py", "tokenizers.py", "models.py", "train.py", "build.py")
BUILD_ORDER = ("arith", "strings", "facts", "pivot")  # longest training first


def fingerprint(cfg: WorldConfig) -> str:
    """Settings (minus the output folder) + the source of the modules that decide the world's content."""
    here = Path(__file__).parent
    return digest({k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}, source_bytes(here, CODE),
                  source_bytes(here.parent / "evals", ("accuracy.py",)))  # it grades the accuracy world.json records


def _tokenizer_texts(splits: dict[str, list[corpus.Chat]]) -> dict[str, list[str]]:
    """Texts to train vocabularies on: `all` chats, and `no_strings` (without the word games)."""
    # every printable character, so trained vocabularies never need <unk> on normal text
    alphabet = ["".join(chr(i) for i in range(32, 127)) + "\n\t"] * 10

    def texts(convs: list[corpus.Chat]) -> list[str]:
        return [f"{m['role']}\n{m['content']}\n" for c in convs for m in c.messages] + alphabet

    chats = [c for split in corpus.SPLITS for c in splits[split]]
    return {"all": texts(chats), "no_strings": texts([c for c in chats if c.domain != "strings"])}


def _train_one(i: int, cfg: WorldConfig, splits: dict[str, list[corpus.Chat]], texts: dict[str, list[str]],
               assets: Path, folder: Path) -> dict:
    """Tokenizer + model + training + held-out loss and accuracy for PLANS[i]; saves the HF folder."""
    torch.set_num_threads(1)
    cpu0 = time.process_time()
    plan = PLANS[i]
    # Train with the tokenizer as it loads back from the folder, not the in-memory object: the
    # two can differ around special tokens (Llama-2's legacy prefix-space rule), and users will
    # only ever have the folder.
    plan.make_tokenizer(texts, assets).save_pretrained(folder)
    tok = load_tokenizer(folder)
    torch.manual_seed(cfg.seed * 100 + i)
    model = build_model(plan, tok)
    if torch.cuda.is_available():
        model = model.to("cuda")
    if plan.domain:  # an expert: all of its skill, plus some chat (it is a chat model)
        own = [c for c in splits["source_train"] if c.domain == plan.domain]
        mix = own + splits["general"][: max(int(len(own) * cfg.expert_chat_share), 1)]
    else:  # the pivot, a generalist like a real pivot (OpenChat): chat plus a little of every skill
        per_skill = int(cfg.n_source_train * cfg.pivot_skill_share)
        mix = splits["general"] + [c for d in corpus.SKILLS
                                   for c in [c for c in splits["source_train"] if c.domain == d][:per_skill]]
    steps = max(1, round(cfg.train_steps * plan.steps))
    losses = train(model, tok, mix, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr * plan.lr,
                   seed=cfg.seed * 100 + i, group_by_length=plan.group_by_length)
    heldout = {d: [c for c in splits["heldout"] if c.domain == d] for d in corpus.DOMAINS}
    model.save_pretrained(folder)
    nats = {d: round(loss_per_char(model, tok, c), 4) for d, c in heldout.items()}
    params = sum(p.numel() for p in model.parameters())
    del model
    accuracy = _heldout_accuracy(plan.name, folder, folder.parent.parent / "answers")
    return {"name": plan.name, "expert_of": plan.domain or "general chat", "architecture": plan.family,
            "tokenizer": plan.tokenizer_kind, "vocab": len(tok), "template": plan.template,
            "params": params, "train_steps": steps,
            "train_loss_first": round(losses[0], 4), "train_loss_last": round(losses[-1], 4),
            "sha256": tensor_hash(folder), "heldout_nats_per_char": nats, "heldout_accuracy": accuracy,
            "cpu_seconds": round(time.process_time() - cpu0, 1)}


# Greedy reply length limit: the longest replies (a three-digit column sum; a chat reply spelt
# letter by letter by the strings model) take about 70 tokens
ANSWER_TOKENS = 96


def _heldout_accuracy(name: str, folder: Path, out: Path) -> dict[str, float]:
    """Greedy accuracy per domain on the held-out questions (`evals.accuracy`); the answers stay
    in `WORLD/answers/model_answer/NAME.jsonl`, so an evaluation of the world models can reuse them."""
    from evals.accuracy import grade, load_key_questions, summarize
    from evals.backends import LocalChatModel, ModelRef
    from evals.config import EvalConfig
    from evals.mtbench import generate_answers, load_answers

    questions = load_key_questions(out.parent / "data" / "heldout_questions.jsonl")
    cfg = EvalConfig(out=str(out), batch_size=64, dtype="float32", device_map=None, max_new_tokens=ANSWER_TOKENS)
    backend = LocalChatModel(ModelRef(name, "local", str(folder)), cfg)
    path = generate_answers(questions, backend, out, cfg, temperature=0.0)
    backend.close()
    table = summarize(grade(questions, {r["question_id"]: r for r in load_answers(path)}, name))
    return {d: round(v["accuracy"], 4) for d, v in table.items() if d != "all"}


def check_out(out: Path) -> None:
    """Refuse, before any work, an output that is a file or a non-empty folder that is no world.

    A world folder (one with `world.json`) is rebuilt in place when its fingerprint differs: that
    is the cache. Anything else there is the user's, and is never deleted.
    """
    if out.exists() and not out.is_dir():
        raise PivotfuseError(f"world.out: {out} is a file, not a world folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "world.json").is_file():
        raise PivotfuseError(f"world.out: {out} is a non-empty folder that is not a demo world (no world.json); "
                             "choose another folder or empty it yourself")


def build_world(cfg: WorldConfig, assets: Path | None = None, progress: bool = True) -> dict:
    """Build the world into `cfg.out` unless an identical one is there; return its `world.json`.

    `assets` is the asset root (`core.assets`: the real Llama-2 tokenizer); default the set-up's.
    A lock file serialises concurrent builders (parallel test sessions, two demos): the second
    waits, then finds the finished world and reuses it.
    """
    out = Path(cfg.out)
    check_out(out)
    assets = Path(assets) if assets is not None else asset_root()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(cfg, out, assets, progress)


def _build_locked(cfg: WorldConfig, out: Path, assets: Path, progress: bool) -> dict:
    fp = fingerprint(cfg)
    meta_path = out / "world.json"
    if meta_path.is_file():
        meta = read_json(meta_path, "a demo-world table (JSON object)")
        if meta.get("fingerprint") == fp:
            return meta
    if missing("llama2", assets):
        raise PivotfuseError(f"{assets}/tokenizers/llama2: the real Llama-2 tokenizer files (needed by the world) are "
                             "missing or altered; run `make install` (or `python -m core.assets fetch`)")
    t0 = time.time()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    splits = corpus.make_corpus(cfg.seed, cfg.n_source_train, cfg.n_general, cfg.n_fusion, cfg.n_heldout,
                                cfg.n_valid)
    for name, convs in splits.items():
        write_conversations(convs, tmp / "data" / f"{name}.jsonl")
    for name in ("valid", "heldout"):  # the same chats as questions with key answers (`eval accuracy`)
        rows = corpus.questions(splits[name])
        (tmp / "data" / f"{name}_questions.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    texts = _tokenizer_texts(splits)
    jobs = [(i, cfg, splits, texts, assets, tmp / "models" / plan.name) for i, plan in enumerate(PLANS)]
    # One model per process, one thread each: tiny models don't scale over threads, and two
    # independent trainings use two cores fully. Each model has its own seed, so the result does
    # not depend on scheduling. The longest trainings start first, so the cores finish together
    # (CPU seconds, measured under load: arith ~270, strings ~180, facts ~80, pivot ~75).
    workers = 1 if torch.cuda.is_available() else max(1, min(len(jobs), os.cpu_count() or 1))
    rows: dict[int, dict] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        order = sorted(jobs, key=lambda job: BUILD_ORDER.index(PLANS[job[0]].name))
        futures = {pool.submit(_train_one, *job): job[0] for job in order}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="world models", disable=not progress):
            rows[futures[fut]] = fut.result()
    table = [rows[i] for i in range(len(PLANS))]
    meta = {"fingerprint": fp, "config": dataclasses.asdict(cfg), "models": table,
            "corpus": {k: len(v) for k, v in splits.items()}, "build_seconds": round(time.time() - t0, 1)}
    (tmp / "world.json").write_text(json.dumps(meta, indent=2))
    publish_folder(tmp, out)
    return meta


def format_table(meta: dict) -> str:
    """Markdown tables: the models, held-out greedy accuracy and loss (nats/char) per domain."""
    lines = ["| model | expert of | architecture | tokenizer | vocab | params | template | steps |",
             "|---|---|---|---|---:|---:|---|---:|"]
    for m in meta["models"]:
        lines.append(f"| {m['name']} | {m['expert_of']} | {m['architecture']} | {m['tokenizer']} | {m['vocab']:,} "
                     f"| {m['params']:,} | {m['template']} | {m['train_steps']} |")
    lines += ["", "| held-out accuracy | " + " | ".join(corpus.DOMAINS) + " |",
              "|---|" + "---:|" * len(corpus.DOMAINS)]
    for m in meta["models"]:
        lines.append(f"| {m['name']} | " + " | ".join(f"{100 * m['heldout_accuracy'][d]:.0f}%" for d in corpus.DOMAINS)
                     + " |")
    lines += ["", "| held-out nats/char | " + " | ".join(corpus.DOMAINS) + " | mean |",
              "|---|" + "---:|" * (len(corpus.DOMAINS) + 1)]
    for m in meta["models"]:
        h = m["heldout_nats_per_char"]
        vals = [h[d] for d in corpus.DOMAINS]
        lines.append(f"| {m['name']} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {sum(vals) / len(vals):.4f} |")
    cpu = ", ".join(f"{m['name']} {m['cpu_seconds']:.0f} s" for m in meta["models"])
    lines.append(f"\nbuilt in {meta['build_seconds']} s (CPU time per model: {cpu}); corpus sizes {meta['corpus']}")
    return "\n".join(lines)
