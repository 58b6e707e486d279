"""WRPO as a TRL `DPOTrainer` subclass: three answers per prompt, one chosen reward that mixes them.

Rows: `prompt` (messages), `chosen` (y_ws, the best source answer), `chosen_target` (y_wt, the
target's own best answer) and `rejected` (y_l), each answer a one-message assistant list, as TRL's
conversational preference data. Tokenisation is TRL's own (`DPOTrainer._prepare_dataset`, run
once for (prompt, chosen, rejected) and once for (prompt, chosen_target, rejected)); a batch of B
rows is one forward pass over 3B sequences [y_ws; y_wt; y_l] through TRL's fused LM head, for the
policy and for the frozen reference (the SFT model: the reference copy, or the adapters switched
off under LoRA). The loss is `implicit.losses.wrpo_loss` with α = `wrpo_alpha(step, max_steps,
alpha_max)`, so a resumed run continues the same schedule.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad, use_adapter

from implicit.losses import implicit_reward, wrpo_alpha, wrpo_loss

ANSWERS = ("chosen_ids", "target_chosen_ids", "rejected_ids")  # batch order: y_ws, y_wt, y_l


@dataclass
class TripleCollator(DataCollatorMixin):
    """Pads B rows of (prompt_ids + each of the three answers) into 3B right-padded sequences."""

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, masks = [], []
        for column in ANSWERS:
            for ex in examples:
                seq = ex["prompt_ids"] + ex[column]
                mask = [0] * len(ex["prompt_ids"]) + [1] * len(ex[column])
                if self.max_length is not None:  # keep the start, as TRL's collator does by default
                    seq, mask = seq[:self.max_length], mask[:self.max_length]
                ids.append(torch.tensor(seq))
                masks.append(torch.tensor(mask, dtype=torch.long))
        attention = [torch.ones(len(x), dtype=torch.long) for x in ids]
        return {"input_ids": pad(ids, self.pad_token_id, "right", self.pad_to_multiple_of),
                "attention_mask": pad(attention, 0, "right", self.pad_to_multiple_of),
                "completion_mask": pad(masks, 0, "right", self.pad_to_multiple_of)}


class WRPOTrainer(DPOTrainer):
    """`DPOTrainer` whose loss is WRPO's: −log σ(β·(α·r(y_ws) + (1−α)·r(y_wt) − r(y_l)))."""

    _tag_names = ["trl", "dpo", "wrpo", "pivotfuse"]

    def __init__(self, *args: Any, alpha_max: float = 0.1, length_normalize: bool = False, **kwargs: Any) -> None:
        self.alpha_max, self.length_normalize = float(alpha_max), bool(length_normalize)
        args_ = kwargs.get("args")
        if args_ is not None and args_.precompute_ref_log_probs:
            raise ValueError("WRPOTrainer computes reference log-probs on the fly (precompute_ref_log_probs=False)")
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: Any, dataset_name: str) -> Dataset:
        if "target_chosen_ids" in dataset.column_names:  # already prepared (evaluate() passes it again)
            return dataset
        missing = [c for c in ("prompt", "chosen", "chosen_target", "rejected") if c not in dataset.column_names]
        if missing:
            raise ValueError(f"WRPO {dataset_name} data needs the column '{missing[0]}'")
        rows = dataset.select_columns(["prompt", "chosen", "chosen_target", "rejected"])
        rows = rows.add_column("row", list(range(len(rows))))  # kept by TRL's map/filter: aligns the passes
        source = super()._prepare_dataset(rows.remove_columns("chosen_target"), processing_class, args, dataset_name)
        target = super()._prepare_dataset(
            rows.remove_columns("chosen").rename_column("chosen_target", "chosen"), processing_class, args,
            dataset_name)
        by_row = {r["row"]: r for r in target}
        out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "target_chosen_ids": [], "rejected_ids": []}
        for a in source:
            b = by_row.get(a["row"])
            if b is None:  # dropped by TRL in one pass (prompt fills max_length): drop it in both
                continue
            # Each pass cuts the prompt where prompt and prompt+answers tokenise alike; the two cuts
            # differ only if a template merges tokens across the boundary: use the earlier one.
            n = min(len(a["prompt_ids"]), len(b["prompt_ids"]))
            out["prompt_ids"].append(a["prompt_ids"][:n])
            out["chosen_ids"].append((a["prompt_ids"] + a["chosen_ids"])[n:])
            out["target_chosen_ids"].append((b["prompt_ids"] + b["chosen_ids"])[n:])
            out["rejected_ids"].append((a["prompt_ids"] + a["rejected_ids"])[n:])
        return Dataset.from_dict(out)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", *ANSWERS]

    def alpha(self) -> float:
        """The fusion coefficient at the current optimizer step."""
        return wrpo_alpha(self.state.global_step, self.state.max_steps, self.alpha_max)

    def _sequence_logps(self, model: Any, inputs: dict[str, torch.Tensor], reference: bool) -> torch.Tensor:
        """log π(y|x) summed over each sequence's answer tokens (policy, or the frozen reference)."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
        context: Any = contextlib.nullcontext()
        if reference:
            if self.ref_model is None and is_peft_model(self.model):  # adapters off = the SFT model
                unwrapped = self.accelerator.unwrap_model(self.model)
                context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
            else:
                model = self.ref_model
        grad = torch.no_grad() if reference else contextlib.nullcontext()
        checkpointing = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs) \
            if reference else contextlib.nullcontext()
        with grad, checkpointing, context:
            out = model(**kwargs, labels=labels, fused_lm_head=True)
        n = inputs["completion_mask"].size(1) - 1
        return out.log_probs[:, -n:].sum(dim=1)

    def _compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool):
        mode = "train" if self.model.training else "eval"
        logps = self._sequence_logps(model, inputs, reference=False)
        ref_logps = self._sequence_logps(model, inputs, reference=True)
        lengths = inputs["completion_mask"][:, 1:].sum(dim=1)
        ws, wt, lo = logps.chunk(3)
        r_ws, r_wt, r_lo = ref_logps.chunk(3)
        n_ws, n_wt, n_lo = lengths.chunk(3)
        alpha = self.alpha()
        losses = wrpo_loss(ws, wt, lo, r_ws, r_wt, r_lo, beta=self.beta, alpha=alpha,
                           lengths=(n_ws, n_wt, n_lo) if self.length_normalize else None)
        loss = losses.mean()

        with torch.no_grad():
            norm = self.length_normalize
            rewards = [self.beta * implicit_reward(p, r, n if norm else None)
                       for p, r, n in ((ws, r_ws, n_ws), (wt, r_wt, n_wt), (lo, r_lo, n_lo))]
            margin = alpha * rewards[0] + (1 - alpha) * rewards[1] - rewards[2]
            stats = torch.stack([*rewards, margin, (margin > 0).to(margin.dtype)], dim=1)  # (B, 5)
            stats = self.accelerator.gather_for_metrics(stats).float().mean(dim=0).tolist()
            names = ("rewards/chosen_source", "rewards/chosen_target", "rewards/rejected", "rewards/margins",
                     "rewards/accuracies")
            for name, value in zip(names, stats):
                self._metrics[mode][name].append(value)
            self._metrics[mode]["alpha"].append(alpha)
        if return_outputs:  # as TRL: the fused head builds no logits, so they are recomputed
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            return loss, outputs
        return loss
