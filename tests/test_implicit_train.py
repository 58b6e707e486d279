"""Training: TRL's DPO losses and our WRPO trainer against the pure losses on hand-computed log-probs,
SFT on answer tokens only, and a tiny SFT → DPO → WRPO run (losses fall, outputs load, resume)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.errors import PivotfuseError
from implicit.config import DPOTrainConfig, SFTTrainConfig, WRPOTrainConfig
from implicit.losses import dpo_loss, wrpo_alpha, wrpo_loss
from implicit.train import common_args, train_dpo, train_sft, train_wrpo
from implicit_helpers import preference_rows, sft_rows, tiny_chat_model, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("implicit_models")
    return tiny_chat_model(root / "policy", seed=0), tiny_chat_model(root / "ref", seed=1)


def _load(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.eval()
    return m


def answer_logp(model, prompt_ids, answer_ids):
    """log π(answer | prompt) summed over the answer tokens: a plain forward and log-softmax."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    token_lp = lp.gather(-1, ids[0, 1:, None])[:, 0]
    return token_lp[len(prompt_ids) - 1:].sum().item()


def _args(tmp_path, cls, **extra):
    cfg = DPOTrainConfig(batch_size=4, max_steps=1)
    return cls(**common_args(cfg, str(tmp_path / "ck"), on_gpu=False, bf16_ok=False), **extra)


@pytest.mark.parametrize("normalise", [False, True])
def test_trl_dpo_loss_is_our_dpo_formula(models, tmp_path, normalise):
    import datasets
    from trl import DPOConfig, DPOTrainer

    args = _args(tmp_path, DPOConfig, beta=0.7, loss_type=["sigmoid_norm" if normalise else "sigmoid"])
    policy, ref = _load(models[0]), _load(models[1])
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tiny_tokenizer(),
                         train_dataset=datasets.Dataset.from_list(preference_rows(4, seed=3)))
    rows = [trainer.train_dataset[i] for i in range(4)]
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()
    p_ref, r_ref = _load(models[0]), _load(models[1])  # unpatched copies for the plain forward
    logs = {k: torch.tensor([answer_logp(m, r["prompt_ids"], r[f"{c}_ids"]) for r in rows])
            for k, m, c in (("pc", p_ref, "chosen"), ("pr", p_ref, "rejected"),
                            ("rc", r_ref, "chosen"), ("rr", r_ref, "rejected"))}
    lens = (torch.tensor([len(r["chosen_ids"]) for r in rows]), torch.tensor([len(r["rejected_ids"]) for r in rows]))
    want = dpo_loss(logs["pc"], logs["pr"], logs["rc"], logs["rr"], 0.7, *(lens if normalise else (None, None)))
    assert loss == pytest.approx(want.mean().item(), rel=1e-4)
    assert abs(loss - math.log(2)) > 1e-3  # the reference differs from the policy: not a trivial log 2


def test_wrpo_trainer_loss_is_our_wrpo_formula_with_the_scheduled_alpha(models, tmp_path):
    import datasets
    from trl import DPOConfig, DPOTrainer

    from implicit.wrpo_trainer import TripleCollator, WRPOTrainer

    tok = tiny_tokenizer()
    rows = preference_rows(4, seed=5, wrpo=True)
    args = _args(tmp_path, DPOConfig, beta=0.4)
    trainer = WRPOTrainer(model=_load(models[0]), ref_model=_load(models[1]), args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_list(rows), alpha_max=0.3,
                          data_collator=TripleCollator(tok.pad_token_id, max_length=args.max_length))
    prepared = [trainer.train_dataset[i] for i in range(4)]
    # the three answers are tokenised exactly as TRL's DPO tokenises a pair
    dpo = DPOTrainer(model=_load(models[0]), ref_model=_load(models[1]), args=_args(tmp_path, DPOConfig),
                     processing_class=tok, train_dataset=datasets.Dataset.from_list(
                         [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]))
    for a, b in zip(prepared, dpo.train_dataset):
        assert (a["prompt_ids"], a["chosen_ids"], a["rejected_ids"]) == (b["prompt_ids"], b["chosen_ids"],
                                                                           b["rejected_ids"])
    trainer.state.global_step, trainer.state.max_steps = 3, 7
    trainer.model.train()  # dropout is off (TRL's disable_dropout): the same numbers, logged as training
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(prepared)).item()
    p, r = _load(models[0]), _load(models[1])
    cols = ("chosen_ids", "target_chosen_ids", "rejected_ids")
    pol = [torch.tensor([answer_logp(p, x["prompt_ids"], x[c]) for x in prepared]) for c in cols]
    ref = [torch.tensor([answer_logp(r, x["prompt_ids"], x[c]) for x in prepared]) for c in cols]
    alpha = wrpo_alpha(3, 7, 0.3)
    assert alpha == pytest.approx(0.15) and trainer.alpha() == alpha
    want = wrpo_loss(*pol, *ref, beta=0.4, alpha=alpha).mean().item()
    assert loss == pytest.approx(want, rel=1e-4)
    assert trainer._metrics["train"]["alpha"] == [alpha]


def test_sft_loss_counts_answer_tokens_only(models, tmp_path):
    rows = sft_rows(8, seed=2)
    res = train_sft(str(models[0]), rows, tmp_path / "sft", SFTTrainConfig(max_steps=1, lr=1e-9, batch_size=8))
    tok, model = tiny_tokenizer(), _load(models[0])
    total, count = 0.0, 0
    for r in rows:
        prompt = tok(tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True))["input_ids"]
        full = tok(tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False))["input_ids"]
        assert full[:len(prompt)] == prompt
        total += -answer_logp(model, prompt, full[len(prompt):])
        count += len(full) - len(prompt)
    assert res["loss_before"] == pytest.approx(total / count, rel=1e-4)


def test_bad_rows_are_refused_with_the_file_and_field(models, tmp_path):
    bad = tmp_path / "dpo.jsonl"
    bad.write_text(json.dumps({"prompt": [], "chosen": []}) + "\n")
    with pytest.raises(PivotfuseError, match=r"dpo.jsonl:1: missing field 'rejected'"):
        train_dpo(str(models[0]), bad, tmp_path / "out", DPOTrainConfig())
    bad.write_text("")
    with pytest.raises(PivotfuseError, match="no rows to train on"):
        train_wrpo(str(models[0]), bad, tmp_path / "out", WRPOTrainConfig())


def _generate(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "w3 w4"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text)["input_ids"]])
    return model.generate(ids, max_new_tokens=3, do_sample=False).shape


@pytest.mark.slow
def test_tiny_sft_then_dpo_then_wrpo_lower_their_losses_and_save_loadable_models(models, tmp_path):
    fast = dict(max_steps=12, batch_size=8, warmup=0, logging_steps=4, lr=1e-2)
    sft = train_sft(str(models[0]), sft_rows(32), tmp_path / "sft", SFTTrainConfig(**fast))
    dpo = train_dpo(str(tmp_path / "sft"), preference_rows(32), tmp_path / "dpo",
                    DPOTrainConfig(beta=0.5, length_normalize=True, **fast))
    wrpo = train_wrpo(str(tmp_path / "sft"), preference_rows(32, wrpo=True), tmp_path / "wrpo",
                      WRPOTrainConfig(beta=0.5, alpha_max=0.5, **fast))
    # LoRA: the reference is the SFT model with the adapters switched off
    lora = train_dpo(str(tmp_path / "sft"), preference_rows(32), tmp_path / "dpo_lora",
                     DPOTrainConfig(beta=8.0, length_normalize=False, lora=True, lora_r=8, lora_alpha=16,
                                    lora_dropout=0.0, **{**fast, "lr": 2e-2}))
    assert sft["loss_after"] < sft["loss_before"] - 0.3
    for res in (dpo, wrpo, lora):  # each starts as its reference: log 2 exactly
        assert res["loss_before"] == pytest.approx(math.log(2), abs=1e-6)
        assert res["loss_after"] < 0.6 and res["steps"] == 12
    alphas = [h["alpha"] for h in wrpo["log_history"] if "alpha" in h]
    assert alphas == sorted(alphas) and alphas[-1] > alphas[0]
    for name in ("sft", "dpo", "wrpo", "dpo_lora"):
        assert _generate(tmp_path / name)[1] > 5
        info = json.loads((tmp_path / name / "implicit_train.json").read_text())
        assert info["kind"] == name.split("_")[0] and not (tmp_path / f"{name}.tmp").exists()
        assert json.loads((tmp_path / name / "config.json").read_text())["use_cache"] is True


@pytest.mark.slow
def test_interrupted_wrpo_resumes_to_the_same_weights(models, tmp_path):
    from transformers import TrainerCallback

    import implicit.wrpo_trainer as wt

    cfg = WRPOTrainConfig(beta=0.5, alpha_max=0.5, max_steps=6, batch_size=8, warmup=0, lr=1e-2, save_steps=3,
                          logging_steps=1)
    rows = preference_rows(24, wrpo=True)
    train_wrpo(str(models[0]), rows, tmp_path / "ref", cfg)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                raise KeyboardInterrupt

    original = wt.WRPOTrainer.__init__

    def with_stop(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(Stop())

    wt.WRPOTrainer.__init__ = with_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train_wrpo(str(models[0]), rows, tmp_path / "cut", cfg)
    finally:
        wt.WRPOTrainer.__init__ = original
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.work" / "checkpoints" / "checkpoint-3").is_dir()
    res = train_wrpo(str(models[0]), rows, tmp_path / "cut", cfg)
    assert res["resumed_from"].endswith("checkpoint-3") and res["steps"] == 6
    a, b = _load(tmp_path / "ref"), _load(tmp_path / "cut")
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(x, y, atol=1e-6), n
    alphas = [h["alpha"] for h in res["log_history"] if "alpha" in h]
    assert alphas == pytest.approx([wrpo_alpha(s, 6, 0.5) for s in range(6)])


@pytest.mark.slow
def test_two_processes_train_wrpo_data_parallel(models, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    rows = tmp_path / "wrpo.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(24, wrpo=True)))
    script = tmp_path / "run.py"
    script.write_text(
        "import json\n"
        "from implicit.config import WRPOTrainConfig\nfrom implicit.train import train_wrpo\n"
        f"res = train_wrpo({str(models[0])!r}, {str(rows)!r}, {str(tmp_path / 'out')!r}, WRPOTrainConfig("
        "beta=0.5, alpha_max=0.5, max_steps=4, batch_size=4, warmup=0, lr=1e-2, logging_steps=1))\n"
        "from accelerate import PartialState\n"
        f"open({str(tmp_path)!r} + f'/rank{{PartialState().process_index}}.json', 'w').write(json.dumps("
        "{'steps': res['steps'], 'epoch': res['log_history'][-1]['epoch']}))\n")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # both ranks finish the same 4 steps; an epoch is 24 rows / (2 ranks × 4 rows) = 3 steps
    assert results == [{"steps": 4, "epoch": pytest.approx(4 / 3)}] * 2
    _load(tmp_path / "out")
