"""Train a tiny chat model on assistant tokens only, and measure its held-out loss.

Loss is reported in nats per character of assistant text: the summed token losses over the
assistant tokens (end-of-turn token included) divided by the characters of the assistant
replies, a denominator that is the same for every tokenizer and template.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from core.chat import Conversation, end_of_turn_tokens, render_chat, reply_ranges, tokenize_chat
from core.logits import head_logits

IGNORE = -100


def encode(tok: PreTrainedTokenizerFast, convs: list[Conversation], max_length: int) -> list[tuple[list[int], list[int], int]]:
    """Each chat → (input_ids, labels with -100 outside assistant tokens, assistant char count)."""
    out = []
    enders = end_of_turn_tokens(tok)
    for c in convs:
        r = render_chat(tok, c.messages)
        t = tokenize_chat(tok, r, max_length=max_length)
        labels = [i if a else IGNORE for i, a in zip(t.input_ids, t.assistant)]
        # Per character of the replies themselves: template markers differ between models.
        nchar = sum(e - s for s, e in reply_ranges(r, enders))
        out.append((t.input_ids, labels, nchar))
    return out


def _batch(rows: list[tuple[list[int], list[int], int]], pad_id: int, device: torch.device):
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y, _) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        attn[i, : len(x)] = 1
    return ids.to(device), labels.to(device), attn.to(device)


def _token_losses(model: PreTrainedModel, ids, labels, attn) -> torch.Tensor:
    """NLL of every assistant token, (N,). The LM head runs on those positions only: with a
    32k vocabulary the full (B, T, V) logits would dominate a tiny model's step time."""
    hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]  # (B, T-1, H)
    target = labels[:, 1:]  # predict token t+1 from position t
    keep = target != IGNORE
    logits = head_logits(model, hidden[keep]).float()  # (N, V)
    return torch.nn.functional.cross_entropy(logits, target[keep], reduction="none")


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random,
                           group: int = 16) -> Iterator[list[int]]:
    """Endless batches of indices: shuffled, then sorted by length within groups of `group` batches,
    so a batch pads to little more than its own length (HF Trainer's `group_by_length`); the
    batches are shuffled again, so lengths do not trend within an epoch."""
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        batches = []
        for g in range(0, len(order), batch_size * group):
            chunk = sorted(order[g:g + batch_size * group], key=lambda i: lengths[i])
            batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        yield from batches


def train(model: PreTrainedModel, tok: PreTrainedTokenizerFast, convs: list[Conversation], *, steps: int,
          batch_size: int, lr: float, seed: int, max_length: int = 192, group_by_length: bool = False) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss per step.

    Batches are drawn at random, or with `group_by_length` from `length_grouped_batches`: a third
    less padding for chats of very mixed lengths, but batches of one kind of chat, which slowed
    the learning of arithmetic and of the fact table where we measured it.
    """
    device = next(model.parameters()).device
    data = encode(tok, convs, max_length)
    rng = random.Random(seed)
    grouped = length_grouped_batches([len(d[0]) for d in data], batch_size, rng) if group_by_length else None
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for _ in range(steps):
        rows = [data[i] for i in next(grouped)] if grouped else rng.sample(data, min(batch_size, len(data)))
        ids, labels, attn = _batch(rows, tok.pad_token_id, device)
        tl = _token_losses(model, ids, labels, attn)
        loss = tl.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def loss_per_char(model: PreTrainedModel, tok: PreTrainedTokenizerFast, convs: list[Conversation],
                  batch_size: int = 32, max_length: int = 192) -> float:
    """Summed assistant-token NLL (nats) / assistant characters."""
    device = next(model.parameters()).device
    model.eval()
    data = encode(tok, convs, max_length)
    total, chars = 0.0, 0
    for i in range(0, len(data), batch_size):
        rows = data[i: i + batch_size]
        ids, labels, attn = _batch(rows, tok.pad_token_id, device)
        total += _token_losses(model, ids, labels, attn).sum().item()
        chars += sum(r[2] for r in rows)
    return total / max(chars, 1)
