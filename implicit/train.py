"""Training phases of implicit fusion with TRL: `train_sft`, `train_dpo`, `train_wrpo`.

Each takes a model folder, the rows `implicit.pairs` wrote (a JSONL path or a list of dicts) and an
output folder, and trains with the device, dtype, LoRA and checkpointing choices of the fusion
trainer (`fuse.train.trainer`): bf16 and gradient checkpointing by default on a GPU, fp32 master weights
for full fine-tuning, LoRA adapters merged into a full-precision load of the input model, resume from
the last complete checkpoint under `work/checkpoints`, `accelerate launch` for data parallelism (CPU
too, over gloo). The output folder is written under a temporary name and renamed when complete; it
holds the model, the input model's tokenizer files and `implicit_train.json` (settings, losses).

- SFT: `SFTTrainer` on prompt-completion rows (loss on the answer tokens only).
- DPO: `DPOTrainer` on prompt/chosen/rejected rows, loss `sigmoid` or `sigmoid_norm` (length-
  normalised), reference = a frozen copy of the input (SFT) model, or the adapters off under LoRA.
- WRPO: `implicit.wrpo_trainer.WRPOTrainer` on prompt/chosen/chosen_target/rejected rows, same reference.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from core.atomic import publish_folder, write_text
from core.files import read_json, read_jsonl
from core.errors import PivotfuseError
from core.loading import copy_tokenizer_files, load_causal_lm, load_tokenizer, read_chat_template, stored_dtype
from fuse.train.trainer import CHECKPOINTING, last_complete_checkpoint, merge_lora
from implicit.config import DPOTrainConfig, SFTTrainConfig, TrainConfig, WRPOTrainConfig

SFT_COLUMNS = ("prompt", "completion")
DPO_COLUMNS = ("prompt", "chosen", "rejected")
WRPO_COLUMNS = ("prompt", "chosen", "chosen_target", "rejected")


def load_rows(data: str | Path | list[dict], columns: tuple[str, ...]) -> tuple[list[dict], str]:
    """(rows reduced to `columns`, where they came from): a JSONL file or a list of dicts."""
    where = str(data) if not isinstance(data, list) else "rows"
    items = ((f"{data}:{n}", r) for n, r in read_jsonl(data)) if not isinstance(data, list) else \
        ((f"row {i}", r) for i, r in enumerate(data))
    rows = []
    for place, row in items:
        missing = [c for c in columns if c not in row]
        if missing:
            raise PivotfuseError(f"{place}: missing field '{missing[0]}' (expected {', '.join(columns)})")
        rows.append({c: row[c] for c in columns})
    if not rows:
        raise PivotfuseError(f"{where}: no rows to train on (the build report says what was dropped)")
    return rows, where


def common_args(cfg: TrainConfig, output_dir: str, on_gpu: bool, bf16_ok: bool) -> dict[str, Any]:
    """TrainingArguments shared by the three phases; bf16 and checkpointing default to on for GPUs."""
    bf16 = cfg.bf16 if cfg.bf16 is not None else (on_gpu and bf16_ok)
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else on_gpu
    return dict(
        output_dir=output_dir, per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, bf16=bf16,
        **{CHECKPOINTING: checkpointing,
           CHECKPOINTING + "_kwargs": {"use_reentrant": False} if checkpointing else None},
        seed=cfg.seed, data_seed=cfg.seed, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, logging_steps=cfg.logging_steps, report_to=[],
        max_length=cfg.max_length, prediction_loss_only=True, dataloader_num_workers=0, disable_tqdm=False,
        # Without an accelerator, say so: only then does a multi-process launch train with DDP over gloo.
        use_cpu=torch.accelerator.current_accelerator() is None,
    )


def _tokenizer(model_dir: str, chat_template: str | None) -> Any:
    tok = load_tokenizer(model_dir)
    if chat_template:
        tok.chat_template = read_chat_template(chat_template)
    if not tok.chat_template:
        raise PivotfuseError(f"{model_dir}: the tokenizer has no chat template (pass chat_template=FILE)")
    if tok.pad_token is None:  # padding is masked out; any id will do
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _lora(cfg: TrainConfig) -> Any:
    if not cfg.lora:
        return None
    from peft import LoraConfig

    targets = cfg.lora_targets[0] if cfg.lora_targets == ["all-linear"] else list(cfg.lora_targets)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


def _run(kind: str, model_dir: str, rows: list[dict], eval_rows: list[dict] | None, out: str | Path,
         work: str | Path | None, cfg: TrainConfig, chat_template: str | None, args_cls: Any,
         extra_args: dict[str, Any], make_trainer: Callable[..., Any]) -> dict[str, Any]:
    """Load, train (resuming), evaluate before/after, save: the part the three phases share."""
    import datasets
    from accelerate import PartialState

    t0 = time.perf_counter()
    if not Path(model_dir).is_dir():
        raise PivotfuseError(f"{model_dir}: not a model folder")
    state = PartialState()
    on_gpu = state.device.type == "cuda"
    bf16_ok = on_gpu and torch.cuda.is_bf16_supported()
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    ckpt_dir = work / "checkpoints"
    args = args_cls(**common_args(cfg, str(ckpt_dir), on_gpu, bf16_ok), **extra_args)
    save_dtype = stored_dtype(model_dir) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    # Full fine-tuning keeps fp32 master weights (bf16 runs under autocast); a LoRA base is frozen.
    load_dtype = torch.bfloat16 if (cfg.lora and args.bf16) else torch.float32
    model = load_causal_lm(model_dir, dtype=load_dtype)
    # The trainers write the pad token and use_cache into the config: the output keeps the input's.
    saved_config = (model.config.pad_token_id, model.config.use_cache, model.generation_config.pad_token_id)
    tokenizer = _tokenizer(model_dir, chat_template)
    train_ds = datasets.Dataset.from_list(rows)
    eval_ds = datasets.Dataset.from_list(eval_rows) if eval_rows is not None else train_ds
    trainer = make_trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                           processing_class=tokenizer, peft_config=_lora(cfg), load_dtype=load_dtype)
    before_file = work / "loss_before.json"
    last = last_complete_checkpoint(ckpt_dir, state.is_main_process)
    if before_file.is_file():
        before = read_json(before_file)
    else:  # measured once, on the untouched input model (a resumed run reuses it)
        before = trainer.evaluate()
        if state.is_main_process:
            work.mkdir(parents=True, exist_ok=True)
            write_text(before_file, json.dumps(before, indent=1) + "\n")
    trainer.train(resume_from_checkpoint=last)
    after = trainer.evaluate()
    result = {"kind": kind, "model": str(model_dir), "loss_before": before["eval_loss"],
              "loss_after": after["eval_loss"], "eval_before": before, "eval_after": after,
              "steps": trainer.state.global_step, "resumed_from": last, "log_history": trainer.state.log_history}

    tmp = out.with_name(out.name + ".tmp")
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(str(tmp))  # gathers the sharded weights; saved in the training dtype
    elif state.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        final = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(final, "merge_and_unload"):  # LoRA: fold the adapters into the weights
            final = merge_lora(final, model_dir, load_dtype, save_dtype, work)
        final.config.pad_token_id, final.config.use_cache, final.generation_config.pad_token_id = saved_config
        final.to(save_dtype).save_pretrained(str(tmp), safe_serialization=True)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if state.is_main_process:
        (tmp / "training_args.bin").unlink(missing_ok=True)
        copy_tokenizer_files(Path(model_dir), tmp)
        if chat_template:
            shutil.copyfile(chat_template, tmp / "chat_template.jinja")
        summary = {k: v for k, v in result.items() if k != "log_history"}
        (tmp / "implicit_train.json").write_text(json.dumps(
            {**summary, "config": dataclasses.asdict(cfg), "log_history": result["log_history"]}, indent=1) + "\n")
        publish_folder(tmp, out)
    state.wait_for_everyone()
    return result


def train_sft(model: str, data: str | Path | list[dict], out: str | Path, cfg: SFTTrainConfig,
              work: str | Path | None = None, chat_template: str | None = None,
              eval_data: str | Path | list[dict] | None = None) -> dict[str, Any]:
    """SFT `model` on prompt/completion rows (`sft.jsonl`); returns losses before/after and the log."""
    from trl import SFTConfig, SFTTrainer

    rows, _ = load_rows(data, SFT_COLUMNS)
    eval_rows = load_rows(eval_data, SFT_COLUMNS)[0] if eval_data is not None else None

    def make(load_dtype: Any, **kw: Any) -> Any:
        return SFTTrainer(**kw)

    return _run("sft", str(model), rows, eval_rows, out, work, cfg, chat_template, SFTConfig,
                {"packing": False, "completion_only_loss": True}, make)


def _reference(model_dir: str, cfg: TrainConfig, load_dtype: Any) -> Any:
    """The frozen reference: a copy of the input (SFT) model; none under LoRA (adapters off)."""
    if cfg.lora:
        return None
    return load_causal_lm(model_dir, dtype=load_dtype)


def train_dpo(model: str, data: str | Path | list[dict], out: str | Path, cfg: DPOTrainConfig,
              work: str | Path | None = None, chat_template: str | None = None,
              eval_data: str | Path | list[dict] | None = None) -> dict[str, Any]:
    """DPO of the SFT model `model` on prompt/chosen/rejected rows (`dpo.jsonl`)."""
    from trl import DPOConfig, DPOTrainer

    rows, _ = load_rows(data, DPO_COLUMNS)
    eval_rows = load_rows(eval_data, DPO_COLUMNS)[0] if eval_data is not None else None

    def make(load_dtype: Any, **kw: Any) -> Any:
        return DPOTrainer(ref_model=_reference(str(model), cfg, load_dtype), **kw)

    extra = {"beta": cfg.beta, "loss_type": ["sigmoid_norm" if cfg.length_normalize else "sigmoid"],
             "precompute_ref_log_probs": False}
    return _run("dpo", str(model), rows, eval_rows, out, work, cfg, chat_template, DPOConfig, extra, make)


def train_wrpo(model: str, data: str | Path | list[dict], out: str | Path, cfg: WRPOTrainConfig,
               work: str | Path | None = None, chat_template: str | None = None,
               eval_data: str | Path | list[dict] | None = None) -> dict[str, Any]:
    """WRPO of the SFT model `model` on prompt/chosen/chosen_target/rejected rows (`wrpo.jsonl`)."""
    from trl import DPOConfig

    from implicit.wrpo_trainer import TripleCollator, WRPOTrainer

    rows, _ = load_rows(data, WRPO_COLUMNS)
    eval_rows = load_rows(eval_data, WRPO_COLUMNS)[0] if eval_data is not None else None

    def make(load_dtype: Any, **kw: Any) -> Any:
        tok = kw["processing_class"]
        return WRPOTrainer(ref_model=_reference(str(model), cfg, load_dtype),
                           data_collator=TripleCollator(tok.pad_token_id, max_length=cfg.max_length),
                           alpha_max=cfg.alpha_max, length_normalize=cfg.length_normalize, **kw)

    extra = {"beta": cfg.beta, "precompute_ref_log_probs": False}
    return _run("wrpo", str(model), rows, eval_rows, out, work, cfg, chat_template, DPOConfig, extra, make)
