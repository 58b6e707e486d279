"""Held-out loss per domain for models with different tokenizers, made comparable.

Unit: **bits per byte** of the assistant replies' UTF-8 text (also nats per character).
Numerator: the model's summed next-token negative log-likelihood over its assistant tokens
(rendered with its own chat template, so its end-of-turn token is included: ending the
reply is part of the answer). Denominator: the UTF-8 bytes of the reply texts themselves,
which are the same for every model whatever its tokenizer or template, so the numbers
compare across tokenizers where per-token losses would not. Chats longer than the context
are cut, and only the reply text before the cut is counted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.atomic import write_text
from core.chat import Conversation, end_of_turn_tokens, load_conversations, render_chat, reply_ranges, tokenize_chat
from core.errors import PivotfuseError
from core.files import brief, is_number, need, read_json
from core.loading import load_causal_lm, load_tokenizer, read_chat_template, vocab_size
from core.measure import phase
from core.logits import final_hidden, head_logits, head_path_known_bad, head_path_ok
from evals.backends import parse_spec
from evals.config import EvalConfig

UNIT = "bits per byte of assistant text (UTF-8), end-of-turn token included in the numerator"


# Logits held at once by the loss, in elements: 2^24 fp32 = 64 MiB, so its peak does not grow with the
# batch's scored positions (at 152k-262k vocabularies (N, V) for a batch of long chats is gigabytes).
LOGIT_BUDGET = 1 << 24


def _scored_nll(model: Any, ids: Any, attn: Any, target: Any) -> Any:
    """NLL of each scored token, (N,). The LM head runs on those rows only, a chunk of at most
    LOGIT_BUDGET logits at a time, where that gives the model's own logits (`core.logits`); else the
    plain full path. Chunks never change a row's value: each row's loss is computed independently."""
    import torch
    import torch.nn.functional as F

    gold = ids[:, 1:][target]  # (N,)
    scored = bool(target.any())
    hidden = final_hidden(model, ids, attn) if scored and not head_path_known_bad(model) else None
    seq = int(target.any(dim=1).int().argmax())  # a sequence with scored rows to check the path on
    if scored and head_path_ok(model, ids, attn, hidden, target[seq].nonzero()[:, 0].cpu().numpy(), seq):
        rows = hidden[:, :-1][target]  # (N, H)
        step = max(1, LOGIT_BUDGET // model.get_output_embeddings().weight.shape[0])
        return torch.cat([F.cross_entropy(head_logits(model, rows[i:i + step]).float(), gold[i:i + step],
                                          reduction="none") for i in range(0, len(rows), step)])
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1][target]  # (N, V)
    return F.cross_entropy(logits.float(), gold, reduction="none")


def chat_losses(model: Any, tokenizer: Any, convs: list[Conversation], *, max_length: int, batch_size: int,
                chat_template: str | None = None, desc: str = "loss") -> list[dict[str, float]]:
    """Per chat: `nats` (summed NLL of assistant tokens), `tokens`, `bytes`, `chars` of reply text;
    a chat the template cannot render (a system message to a template without a system role) is
    `{"skipped": reason}`, never an error."""
    import torch

    items: list[Any] = []
    results: list[dict[str, Any]] = [{} for _ in convs]
    enders = end_of_turn_tokens(tokenizer)
    for n, conv in enumerate(convs):
        try:
            rendered = render_chat(tokenizer, conv.messages, chat_template)
        except PivotfuseError as e:
            results[n] = {"skipped": str(e)}
            items.append(None)
            continue
        tok = tokenize_chat(tokenizer, rendered, max_length)
        cut = tok.offsets[-1][1] if tok.truncated else len(rendered.text)
        texts = [rendered.text[s:min(e, cut)] for s, e in reply_ranges(rendered, enders) if s < cut]
        items.append((tok, sum(len(t.encode("utf-8")) for t in texts), sum(len(t) for t in texts)))
    order = sorted((i for i in range(len(items)) if items[i] is not None), key=lambda i: len(items[i][0].input_ids))
    device = model.device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        width = max(len(items[i][0].input_ids) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long, device=device)  # (B, T), right-padded
        attn = torch.zeros(len(idx), width, dtype=torch.long, device=device)
        scored = torch.zeros(len(idx), width, dtype=torch.bool, device=device)
        for row, i in enumerate(idx):
            tok = items[i][0]
            n = len(tok.input_ids)
            ids[row, :n] = torch.tensor(tok.input_ids, device=device)
            attn[row, :n] = 1
            scored[row, :n] = torch.tensor(tok.assistant, device=device)
        target = scored[:, 1:]  # token t is predicted from position t-1; token 0 has no prediction
        with torch.no_grad():
            nll = _scored_nll(model, ids, attn, target)  # (N,)
        rows = target.nonzero()[:, 0]
        per_row = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows, nll.double())
        counts = target.sum(dim=1)
        for row, i in enumerate(idx):
            results[i] = {"nats": per_row[row].item(), "tokens": int(counts[row]), "bytes": items[i][1],
                          "chars": items[i][2]}
    return results


def summarize(convs: list[Conversation], losses: list[dict[str, float]],
              where: str = "held-out data") -> dict[str, dict[str, float]]:
    """Per domain (and `all`): bits per byte, nats per char, tokens, bytes, chats (scored), and
    `skipped` (chats the template could not render) where there are any. A domain with no scored
    reply text is an error naming `where`: its bits per byte would be 0/0 (NaN)."""
    groups: dict[str, list[dict[str, float]]] = {}
    skipped: dict[str, int] = {}
    for conv, loss in zip(convs, losses):
        for key in (conv.domain or "none", "all"):
            if "skipped" in loss:
                skipped[key] = skipped.get(key, 0) + 1
                groups.setdefault(key, [])
            else:
                groups.setdefault(key, []).append(loss)
    table = {}
    for domain in sorted(groups, key=lambda d: (d == "all", d)):
        rows = groups[domain]
        if not rows:
            raise PivotfuseError(f"{where}: the chat template renders none of the {skipped[domain]} chats of "
                                 f"domain {domain!r} (first reason: "
                                 f"{next(r['skipped'] for c, r in zip(convs, losses) if 'skipped' in r)})")
        nats, nbytes, chars = (sum(r[k] for r in rows) for k in ("nats", "bytes", "chars"))
        if not nbytes:
            raise PivotfuseError(f"{where}: no assistant text of domain {domain!r} is left to score in its "
                                 f"{len(rows)} chats (replies cut off by max_length count nothing)")
        table[domain] = {"bits_per_byte": nats / math.log(2) / nbytes, "nats_per_char": nats / chars,
                         "tokens": sum(r["tokens"] for r in rows), "bytes": nbytes, "chats": len(rows)}
        if skipped.get(domain):
            table[domain]["skipped"] = skipped[domain]
    return table


def check_scorable(convs: list[Conversation], data_path: str | Path) -> None:
    """Every domain of a held-out file needs assistant text, before any model is loaded: the
    loss of a domain with nothing to score is not a number."""
    has_text: dict[str, bool] = {}
    for conv in convs:
        text = any(m["role"] == "assistant" and m["content"].strip() for m in conv.messages)
        has_text[conv.domain or "none"] = has_text.get(conv.domain or "none", False) or text
    if not any(has_text.values()):
        raise PivotfuseError(f"{data_path}: no chat has an assistant turn with text: nothing to score")
    for domain, text in has_text.items():
        if not text:
            n = sum((c.domain or "none") == domain for c in convs)
            raise PivotfuseError(f"{data_path}: domain {domain!r} has no assistant text ({n} chats): nothing "
                                 "to score; give its chats assistant turns or leave them out")


def read_loss_file(path: str | Path) -> dict:
    """`OUT/loss.json`, checked: `models` maps each model to {domain: {bits_per_byte: number, ...}}."""
    data = read_json(path)
    models = need(data, "models", lambda v: isinstance(v, dict), "a mapping of model names to domains", str(path))
    for name, row in models.items():
        if not isinstance(row, dict):
            raise PivotfuseError(f"{path}: 'models.{name}' must be a mapping of domains, got {brief(row)}")
        for domain, stats in row.items():
            if not isinstance(stats, dict):
                raise PivotfuseError(f"{path}: 'models.{name}.{domain}' must be a mapping, got {brief(stats)}")
            need(stats, "bits_per_byte", is_number, "a number", str(path), f"models.{name}.{domain}.bits_per_byte")
    return data


def heldout_loss(models: dict[str, str], data_path: str | Path, cfg: EvalConfig | None = None,
                 chat_templates: dict[str, str] | None = None, out: str | Path | None = None) -> dict[str, dict]:
    """{model name: {domain: stats}} for local model folders on one held-out file.

    With `out`, results go to `OUT/loss.json` (merged with models already there); a model already
    in it for the same data and max_length is not recomputed.
    """
    import torch

    cfg = cfg or EvalConfig()
    convs = load_conversations(data_path)
    check_scorable(convs, data_path)
    path = Path(out) / "loss.json" if out else None
    saved = read_loss_file(path) if path and path.is_file() else {}
    same = saved.get("data") == str(data_path) and saved.get("max_length") == cfg.max_length
    done = saved.get("models", {}) if same else {}
    table: dict[str, dict] = {}
    for name, spec in models.items():
        if name in done:
            table[name] = done[name]
            continue
        ref = parse_spec(spec)
        if ref.kind != "local":
            raise PivotfuseError(f"{name}: held-out loss needs a local model folder, not an endpoint ({spec})")
        template_file = (chat_templates or {}).get(name)
        tokenizer = load_tokenizer(ref.target, name=name)
        template = read_chat_template(template_file)
        device_map = cfg.device_map if torch.cuda.is_available() else None
        with phase("loss", name, vocab=vocab_size(ref.target)):
            model = load_causal_lm(ref.target, dtype=cfg.dtype, device_map=device_map, name=name)
            limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
            max_length = min(cfg.max_length, limit or cfg.max_length)
            losses = chat_losses(model, tokenizer, convs, max_length=max_length, batch_size=cfg.batch_size,
                                 chat_template=template, desc=f"loss {name}")
            table[name] = summarize(convs, losses, f"{name} on {data_path} (max_length {max_length})")
            del model
        skipped = [r["skipped"] for r in losses if "skipped" in r]
        if skipped:
            print(f"loss {name}: skipped {len(skipped)} of {len(convs)} chats its chat template cannot render "
                  f"(e.g. {skipped[0]})", flush=True)
        if path:
            done[name] = table[name]
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps({"data": str(data_path), "max_length": cfg.max_length, "unit": UNIT,
                                         "models": done}, indent=1))
    return table
