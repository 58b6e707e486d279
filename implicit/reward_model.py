"""A local reward model: an HF sequence-classification folder that scores (prompt, answer) chats.

Each chat is rendered with the reward model's own chat template (prompt messages + the answer as
the assistant turn) and scored by the model's head at the last non-pad token: `score` from models
that return one (ArmoRM's preference score), else `logits[:, label_index]`. Batches are sorted by
length and right-padded; the head picks the same token with or without padding, so batched
scores equal one-by-one scores.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import PivotfuseError
from core.loading import read_chat_template
from evals.backends import parse_spec
from implicit.prompts import Prompt


class RewardModelScorer:
    """Scores answers with a sequence-classification model (`AutoModelForSequenceClassification`)."""

    kind = "reward_model"

    def __init__(self, spec: str, *, batch_size: int = 8, max_length: int = 4096, dtype: str = "auto",
                 device_map: str | None = "auto", label_index: int = 0, trust_remote_code: bool = False,
                 chat_template: str | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        ref = parse_spec(spec)
        if ref.kind != "local":
            raise PivotfuseError(f"reward model {spec!r}: must be a local folder (an HF sequence-classification model)")
        self.name, self.folder = ref.name, str(Path(ref.target).resolve())
        self.batch_size, self.max_length, self.label_index = batch_size, max_length, label_index
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(ref.target, trust_remote_code=trust_remote_code)
            device = device_map if torch.cuda.is_available() else None
            self.model = AutoModelForSequenceClassification.from_pretrained(
                ref.target, dtype=dtype, device_map=device, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any load failure is a bad folder
            raise PivotfuseError(f"reward model {ref.target}: cannot load a sequence-classification model ({e})") from None
        self.model.eval()
        self.template = read_chat_template(chat_template) if chat_template else self.tokenizer.chat_template
        if not self.template:
            raise PivotfuseError(f"reward model {ref.target}: its tokenizer has no chat template (pass one)")
        labels = getattr(self.model.config, "num_labels", 1)
        if not 0 <= label_index < labels:
            raise PivotfuseError(f"reward model {ref.target}: label_index {label_index} but the head has {labels} labels")
        if self.tokenizer.pad_token_id is None:  # any id will do: the head reads the last non-pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.truncated = 0
        self.settings = {"kind": self.kind, "model": self.folder, "max_length": max_length,
                         "label_index": label_index, "chat_template": chat_template}

    def ids(self, prompt: Prompt, answer: str) -> list[int]:
        messages = prompt.messages + [{"role": "assistant", "content": answer}]
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False)
        except Exception as e:  # noqa: BLE001 - jinja raises bare exceptions
            raise PivotfuseError(f"reward model {self.name}: chat template failed on prompt {prompt.id!r}: {e}") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds BOS
        if len(ids) > self.max_length:
            self.truncated += 1
            ids = ids[:self.max_length]
        return ids

    def score(self, items: list[tuple[Prompt, str]]) -> list[tuple[float | None, str | None]]:
        import torch

        seqs = [self.ids(p, a) for p, a in items]
        scores: list[float] = [0.0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        device = self.model.device
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in idx], device=device)
            mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in idx], device=device)
            with torch.no_grad():
                out = self.model(input_ids=ids, attention_mask=mask)
            values = getattr(out, "score", None)
            values = values.reshape(len(idx), -1)[:, 0] if values is not None else out.logits[:, self.label_index]
            for i, v in zip(idx, values.float().tolist()):
                scores[i] = v
        return [(s, None) for s in scores]

    def close(self) -> None:
        del self.model
