"""The fusion trainer: TRL's `SFTTrainer` with a collator for sparse top-k targets and the fusion loss.

Rows of the training dataset (one conversation tokenised by the pivot):
    input_ids       (L,)   int
    labels          (L,)   int, −100 outside assistant tokens (unshifted, as in transformers)
    target_ids      (L, k) int, −1 padding; row t is the fused distribution over token t
    target_logprobs (L, k) float, −inf padding
or, compactly, target_ids/target_logprobs (n, k) for the n labelled positions in order (what
`fuse.targets.rows` writes: prompts cost nothing); the collator scatters them to (L, k).

The data is used as is (`skip_prepare_dataset`, no packing: packing would misalign the side data)
and no column is dropped (`remove_unused_columns=False`). `compute_loss` takes the final hidden
states and projects the labelled positions onto the vocabulary a chunk at a time, forward and
backward (`chunked_fusion_loss`), so no (N, V) logits tensor exists; a model that does not allow it
(see `fuse.train.head`) is asked for the logits of the labelled positions only (`logits_to_keep`
with a boolean mask): (N, V) for N assistant tokens, not (B, L, V).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from trl import SFTConfig, SFTTrainer

from core.atomic import publish_folder, write_text
from core.files import read_json
from core.logits import accepts_logits_mask
from core.loading import copy_tokenizer_files, load_causal_lm, load_tokenizer, stored_dtype
from fuse.train.config import FuseConfig
from fuse.train.head import find_head, forward_hidden
from fuse.train.loss import IGNORE_INDEX, chunked_fusion_loss, fusion_loss

FUSION_COLUMNS = ("input_ids", "labels", "target_ids", "target_logprobs")


@dataclass
class FusionCollator:
    """Right-pads a list of rows into tensors: ids with `pad_token_id`, labels −100, targets −1/−inf."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        # (n, k) per row; a row may hold fewer top-k columns than another (padded below)
        t_rows = []
        for r, n in zip(rows, lengths):
            ids = torch.as_tensor(np.asarray(r["target_ids"], dtype=np.int32))
            lp = torch.as_tensor(np.asarray(r["target_logprobs"], dtype=np.float32))
            ids, lp = ids.reshape(ids.shape[0], -1), lp.reshape(lp.shape[0], -1)
            t_rows.append((ids, lp))
        B, L, k = len(rows), max(lengths), max(ids.shape[1] for ids, _ in t_rows)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        t_ids = torch.full((B, L, k), -1, dtype=torch.int32)
        t_lp = torch.full((B, L, k), -math.inf, dtype=torch.float32)
        for b, (r, n, (ids, lp)) in enumerate(zip(rows, lengths, t_rows)):
            input_ids[b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            attention[b, :n] = 1
            labels[b, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
            if ids.shape[0] == n:  # dense: row t belongs to position t
                where = torch.arange(n)
            else:  # compact: row i belongs to the i-th labelled position
                where = torch.nonzero(labels[b, :n] != IGNORE_INDEX).squeeze(-1)
                if len(where) != ids.shape[0]:
                    raise ValueError(f"row {b}: {ids.shape[0]} target rows for {n} tokens and {len(where)} labels")
            t_ids[b, where, : ids.shape[1]] = ids
            t_lp[b, where, : lp.shape[1]] = lp
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "target_ids": t_ids, "target_logprobs": t_lp}


def fusion_step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], lam: float, temperature: float,
                     num_items: torch.Tensor | int | None = None, logits_to_keep: bool | None = None,
                     chunked: bool | None = None, chunk_size: int | None = None):
    """Forward `batch` (a `FusionCollator` output) and return (`FusionLossOutput`, model outputs).

    By default (`chunked` None or True) the loss comes from the final hidden states and the LM head,
    a chunk of `chunk_size` positions at a time (`chunked_fusion_loss`: no (N, V) logits), where the
    model allows it (`fuse.train.head.find_head`). Otherwise, or with `chunked=False`, from logits:
    with `logits_to_keep` (default: when `accepts_logits_mask(model)`) only the scored positions are
    projected onto the vocabulary, (N, V) instead of (B, L, V).
    """
    labels = batch["labels"][:, 1:]  # (B, L−1): logits at t predict token t+1
    keep = labels != IGNORE_INDEX  # (B, L−1)
    model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    head = find_head(model) if chunked is not False else None
    if head is not None:
        hidden, outputs = forward_hidden(model, head, model_inputs)
        if hidden is not None:
            lin = head.linear
            out = chunked_fusion_loss(hidden[:, :-1], lin.weight, labels, batch["target_ids"][:, 1:],
                                      batch["target_logprobs"][:, 1:], lam, temperature, num_items, bias=lin.bias,
                                      chunk_size=chunk_size, scale=head.scale, softcap=head.softcap)
            return out, outputs
    if logits_to_keep is None:
        logits_to_keep = accepts_logits_mask(model)
    if logits_to_keep:
        mask = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)  # (B, L)
        outputs = model(**model_inputs, logits_to_keep=mask)
        logits = outputs.logits  # (N, V)
    else:
        outputs = model(**model_inputs)
        logits = outputs.logits[:, :-1][keep]  # (N, V)
    out = fusion_loss(logits, labels[keep], batch["target_ids"][:, 1:][keep], batch["target_logprobs"][:, 1:][keep],
                      lam=lam, temperature=temperature, num_items=num_items)
    return out, outputs


class FuseTrainer(SFTTrainer):
    """`SFTTrainer` whose loss is λ·CE(gold) + (1−λ)·CE(fused top-k target ‖ student)."""

    def __init__(self, *args: Any, lam: float = 0.9, temperature: float = 1.0, chunked: bool | None = None,
                 **kwargs: Any) -> None:
        self.lam, self.temperature, self.chunked = float(lam), float(temperature), chunked
        super().__init__(*args, **kwargs)
        self._logits_to_keep = accepts_logits_mask(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        out, outputs = fusion_step_loss(model, inputs, self.lam, self.temperature, num_items_in_batch,
                                        self._logits_to_keep, self.chunked)
        loss = out.loss
        # As in SFTTrainer: `num_items_in_batch` counts every rank's tokens while DDP averages gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        sums = torch.stack([out.ce_sum.float(), out.kd_sum.float(), out.n_tokens.float(), out.n_targets.float()])
        ce, kd, n, n_t = self.accelerator.gather_for_metrics(sums.unsqueeze(0)).sum(0).tolist()
        if mode == "eval":  # token-weighted totals for `evaluate_losses`
            self.eval_totals = [a + b for a, b in zip(getattr(self, "eval_totals", [0.0] * 4), (ce, kd, n, n_t))]
        if n > 0:
            self._metrics[mode]["ce_gold"].append(ce / n)
            self._metrics[mode]["ce_fused"].append(kd / n)
            self._metrics[mode]["target_coverage"].append(n_t / n)
        return (loss, outputs) if return_outputs else loss


# Recent transformers 5 releases renamed gradient_checkpointing; earlier 5.x know only the old name.
CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
                  else "gradient_checkpointing")


def training_args(cfg: FuseConfig, output_dir: str, on_gpu: bool, bf16_ok: bool) -> SFTConfig:
    """SFTConfig from the recipe's `fuse` section; bf16 and checkpointing default to on for GPUs."""
    bf16 = cfg.bf16 if cfg.bf16 is not None else (on_gpu and bf16_ok)
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else on_gpu
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        bf16=bf16,
        **{CHECKPOINTING: checkpointing,
           CHECKPOINTING + "_kwargs": {"use_reentrant": False} if checkpointing else None},
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        report_to=[],
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        max_length=None,
        packing=False,
        prediction_loss_only=True,
        dataloader_num_workers=0,
        disable_tqdm=False,
        # Without an accelerator, say so: only then does a multi-process launch train with DDP
        # over gloo (else each CPU process would train alone).
        use_cpu=torch.accelerator.current_accelerator() is None,
    )


def last_complete_checkpoint(ckpt_dir: Path, is_main: bool) -> str | None:
    """The newest checkpoint that was written to the end, or None.

    Trainer writes `checkpoint-N` in place and `trainer_state.json` last, so a run killed while
    saving leaves a folder without it: such folders are ignored (and removed by the main process),
    where transformers' `get_last_checkpoint` would pick them and fail to resume.
    """
    import shutil

    if not ckpt_dir.is_dir():
        return None
    found = sorted((int(p.name.split("-")[1]), p) for p in ckpt_dir.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    complete = [p for _, p in found if (p / "trainer_state.json").is_file()]
    if is_main:
        for _, p in found:
            if not (p / "trainer_state.json").is_file():
                shutil.rmtree(p, ignore_errors=True)
    return str(complete[-1]) if complete else None


def _evaluate(trainer: FuseTrainer, dataset: Any) -> dict[str, float]:
    """Fusion loss, gold CE and fused-target CE per labelled token over `dataset` (token-weighted,
    all ranks), and the share of tokens with a fused target."""
    trainer.eval_totals = [0.0] * 4
    trainer.evaluate(eval_dataset=dataset, metric_key_prefix="eval")
    ce, kd, n, n_t = trainer.eval_totals
    n = max(n, 1.0)
    return {"loss": (trainer.lam * ce + (1 - trainer.lam) * kd) / n, "ce_gold": ce / n, "ce_fused": kd / n,
            "target_coverage": n_t / n, "tokens": int(n)}


def merge_lora(model: Any, pivot_dir: str, load_dtype: torch.dtype, save_dtype: torch.dtype, work: Path) -> Any:
    """The pivot with the LoRA adapters merged in. When the frozen base was trained in a lower
    precision than the target is saved in (a bf16 base under a float32 pivot), the adapters are
    merged into a fresh load of the pivot at `save_dtype`: the frozen weights stay exactly the
    pivot's, not bf16-rounded copies."""
    if torch.finfo(load_dtype).bits >= torch.finfo(save_dtype).bits:
        return model.merge_and_unload()
    from peft import PeftModel

    adapter = work / "adapter"
    model.save_pretrained(str(adapter))  # adapters only (kept in float32 by PEFT)
    base = load_causal_lm(pivot_dir, dtype=save_dtype)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def train_target(cfg: FuseConfig, pivot_dir: str, dataset: Any, out_dir: str, work_dir: str,
                 eval_dataset: Any = None, write_extra: Callable[[Path, dict], None] | None = None) -> dict[str, Any]:
    """Train a copy of the pivot on `dataset` (fusion rows) and save it as an HF folder at `out_dir`.

    Checkpoints go to `work_dir/checkpoints`; a rerun resumes from the last one. The folder is
    written under a temporary name and renamed when complete. Returns the losses on
    `eval_dataset` before and after training, the log history and the step count;
    `write_extra(folder, result)` adds files to the folder before it is renamed into place.
    """
    import json
    import shutil

    from accelerate import PartialState

    state = PartialState()
    on_gpu = state.device.type == "cuda"
    bf16_ok = on_gpu and torch.cuda.is_bf16_supported()
    work = Path(work_dir)
    ckpt_dir = work / "checkpoints"
    args = training_args(cfg, str(ckpt_dir), on_gpu, bf16_ok)
    save_dtype = stored_dtype(pivot_dir) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    # Full fine-tuning keeps fp32 master weights (bf16 runs under autocast); a LoRA base is frozen,
    # so it can stay in bf16.
    load_dtype = torch.bfloat16 if (cfg.lora and args.bf16) else torch.float32
    model = load_causal_lm(pivot_dir, dtype=load_dtype)
    # SFTTrainer writes the pad token and use_cache into the config: the target keeps the pivot's.
    saved_config = (model.config.pad_token_id, model.config.use_cache, model.generation_config.pad_token_id)
    tokenizer = load_tokenizer(pivot_dir)
    if tokenizer.pad_token is None:  # padding is masked out; any id will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        targets = cfg.lora_targets[0] if cfg.lora_targets == ["all-linear"] else list(cfg.lora_targets)
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")
    trainer = FuseTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          data_collator=FusionCollator(tokenizer.pad_token_id), peft_config=peft_config,
                          lam=cfg.lam, temperature=cfg.temperature)
    eval_dataset = eval_dataset if eval_dataset is not None else dataset
    before_file = work / "loss_before.json"
    last = last_complete_checkpoint(ckpt_dir, state.is_main_process)
    if before_file.is_file():
        before = read_json(before_file)
    else:  # measured once, on the untouched pivot (a resumed run reuses it)
        before = _evaluate(trainer, eval_dataset)
        if state.is_main_process:
            write_text(before_file, json.dumps(before, indent=1) + "\n")
    trainer.train(resume_from_checkpoint=last)
    after = _evaluate(trainer, eval_dataset)

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(str(tmp))  # gathers the sharded weights; saved in the training dtype
    elif state.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        final = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(final, "merge_and_unload"):  # LoRA: fold the adapters into the weights
            final = merge_lora(final, pivot_dir, load_dtype, save_dtype, work)
        final.config.pad_token_id, final.config.use_cache, final.generation_config.pad_token_id = saved_config
        final.to(save_dtype).save_pretrained(str(tmp), safe_serialization=True)
    result = {"loss_before": before, "loss_after": after, "steps": trainer.state.global_step,
              "resumed_from": last, "log_history": trainer.state.log_history}
    if state.is_main_process:
        (tmp / "training_args.bin").unlink(missing_ok=True)
        copy_tokenizer_files(Path(pivot_dir), tmp)
        if write_extra is not None:
            write_extra(tmp, result)
        publish_folder(tmp, out)
    state.wait_for_everyone()
    return result
