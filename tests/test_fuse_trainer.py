"""The fusion trainer on a tiny random Llama: collator, loss path, training, LoRA, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fuse.train.config import FuseConfig
from fuse.train.loss import fusion_loss
from fuse.train.trainer import FusionCollator, accepts_logits_mask, fusion_step_loss, train_target

V = 48


def tiny_pivot(path: Path) -> Path:
    """A 2-layer Llama and a word-level tokenizer over V tokens, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, V)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def rows(n=48, k=4, seed=0):
    """Sequences following w_{i+1} = w_i + 1 (mod), teachers that agree, prompts masked."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(8, 16, (1,), generator=g))
        start = int(torch.randint(2, V, (1,), generator=g))
        ids = [2 + (start + i) % (V - 2) for i in range(L)]
        labels = [-100] * 3 + ids[3:]
        t_ids = [[ids[t], 2 + (ids[t] + 5) % (V - 2)] + [-1] * (k - 2) for t in range(L)]
        t_lp = [[math.log(0.8), math.log(0.2)] + [-math.inf] * (k - 2) for _ in range(L)]
        out.append({"input_ids": ids, "labels": labels, "target_ids": t_ids, "target_logprobs": t_lp})
    return out


@pytest.fixture(scope="module")
def pivot(tmp_path_factory):
    return tiny_pivot(tmp_path_factory.mktemp("pivot"))


def test_collator_pads_every_column():
    batch = FusionCollator(pad_token_id=7)(rows(2)[:2])
    L = batch["input_ids"].shape[1]
    r = rows(2)
    n0, n1 = len(r[0]["input_ids"]), len(r[1]["input_ids"])
    short, n = (0, n0) if n0 < n1 else (1, n1)
    assert L == max(n0, n1) and batch["target_ids"].shape == (2, L, 4)
    assert torch.all(batch["input_ids"][short, n:] == 7) and torch.all(batch["attention_mask"][short, n:] == 0)
    assert torch.all(batch["labels"][short, n:] == -100) and torch.all(batch["target_ids"][short, n:] == -1)
    assert torch.all(torch.isinf(batch["target_logprobs"][short, n:]))


def test_step_loss_with_logits_to_keep_equals_full_logits(pivot):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pivot)
    if not accepts_logits_mask(model):
        pytest.skip("this transformers release's models take no boolean logits_to_keep mask")
    batch = FusionCollator(pad_token_id=1)(rows(4))
    kept = fusion_step_loss(model, batch, 0.8, 1.3, logits_to_keep=True, chunked=False)[0].loss
    full = fusion_step_loss(model, batch, 0.8, 1.3, logits_to_keep=False, chunked=False)[0].loss
    # and both equal the loss written on the shifted full-logit tensors
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = fusion_loss(logits[:, :-1], batch["labels"][:, 1:], batch["target_ids"][:, 1:],
                      batch["target_logprobs"][:, 1:], lam=0.8, temperature=1.3).loss
    assert abs(kept.item() - ref.item()) < 1e-5 and abs(full.item() - ref.item()) < 1e-5


def _step_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = fusion_step_loss(model, batch, 0.8, 1.3, num_items=40, **kw)[0]
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_step_equals_the_logits_step_values_and_gradients(pivot, tied):
    from transformers import AutoModelForCausalLM

    from fuse.train.head import find_head

    model = AutoModelForCausalLM.from_pretrained(pivot, tie_word_embeddings=tied)
    assert find_head(model) is not None
    batch = FusionCollator(pad_token_id=1)(rows(4))
    ref, ref_g = _step_grads(model, batch, chunked=False)
    for chunk in (1, 7, None):
        got, got_g = _step_grads(model, batch, chunked=True, chunk_size=chunk)
        assert model._pivotfuse_chunked_head is True  # the first-step check passed: the chunked path ran
        assert abs(got.loss.item() - ref.loss.item()) < 1e-6 and got.n_tokens.item() == ref.n_tokens.item()
        assert abs(got.kd_sum.item() - ref.kd_sum.item()) < 1e-4
        assert got_g.keys() == ref_g.keys() == {n for n, _ in model.named_parameters()}
        worst = max((got_g[n] - ref_g[n]).abs().max().item() for n in ref_g)
        assert worst < 1e-6, worst


def test_chunked_step_under_lora_and_a_head_it_cannot_reproduce(pivot):
    """LoRA wraps the model (the head stays a plain Linear: the chunked path runs under PEFT); a config
    transform the architecture does not apply fails the first-step check: that model trains on logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fuse.train.head import find_head

    batch = FusionCollator(pad_token_id=1)(rows(4, seed=2))
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(pivot),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    assert find_head(peft) is not None
    ref, ref_g = _step_grads(peft, batch, chunked=False)
    got, got_g = _step_grads(peft, batch)
    assert abs(got.loss.item() - ref.loss.item()) < 1e-6 and got_g.keys() == ref_g.keys()
    assert all(n.count("lora") for n in got_g) and max((got_g[n] - ref_g[n]).abs().max().item() for n in ref_g) < 1e-6
    odd = AutoModelForCausalLM.from_pretrained(pivot)
    odd.config.final_logit_softcapping = 2.0  # Llama does not softcap: the head check must notice
    got = fusion_step_loss(odd, batch, 0.8, 1.3)[0].loss
    assert odd._pivotfuse_chunked_head is False and find_head(odd) is None
    assert abs(got.item() - fusion_step_loss(odd, batch, 0.8, 1.3, chunked=False)[0].loss.item()) < 1e-6


def _params(path):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


@pytest.mark.parametrize("lora,bf16", [(False, None), (True, None), (True, True)])
def test_short_run_lowers_loss_changes_weights_and_saves_a_loadable_target(pivot, tmp_path, lora, bf16):
    """bf16 with LoRA: the frozen base trains in bf16 (as on a GPU); the float32 target must keep
    the pivot's exact frozen weights."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ds = datasets.Dataset.from_list(rows())
    cfg = FuseConfig(lr=1e-2 if not lora else 2e-2, max_steps=24, batch_size=8, warmup=0, logging_steps=4,
                     save_steps=100, lora=lora, lora_r=8, lora_alpha=16, lora_dropout=0.0, bf16=bf16)
    out = tmp_path / "target"
    res = train_target(cfg, str(pivot), ds, str(out), str(tmp_path / "work"), eval_dataset=ds.select(range(16)))
    assert res["steps"] == 24
    # LoRA on a random 2-layer model with frozen random embeddings learns slowly; it must still learn
    assert res["loss_after"]["loss"] < res["loss_before"]["loss"] - (0.1 if lora else 1.0)
    before, after = _params(pivot), _params(out)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if lora:  # adapters on every linear layer, merged: those weights change, the rest stays
        linear = {n for n in before if n.endswith("proj.weight")}
        assert changed == linear
    else:
        assert changed == set(before)  # every trainable parameter moved
    assert not any(n.startswith("base_model") or "lora" in n for n in after)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    gen = model.generate(torch.tensor([tok("w5 w6 w7")["input_ids"]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)
    assert json.loads((out / "config.json").read_text())["use_cache"] is True  # the pivot's config, not training's
    assert not (tmp_path / "target.tmp").exists()


def test_interrupted_run_resumes_to_the_same_step_and_weights(pivot, tmp_path):
    import datasets
    from transformers import TrainerCallback

    import fuse.train.trainer as trainer_mod

    ds = datasets.Dataset.from_list(rows())
    cfg = FuseConfig(lr=1e-2, max_steps=10, batch_size=8, warmup=0, logging_steps=5, save_steps=4)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 6:
                raise KeyboardInterrupt

    train_target(cfg, str(pivot), ds, str(tmp_path / "ref"), str(tmp_path / "w_ref"))
    original = trainer_mod.FuseTrainer.__init__

    def with_stop(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(Stop())

    trainer_mod.FuseTrainer.__init__ = with_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train_target(cfg, str(pivot), ds, str(tmp_path / "t"), str(tmp_path / "w"))
    finally:
        trainer_mod.FuseTrainer.__init__ = original
    assert not (tmp_path / "t").exists() and (tmp_path / "w" / "checkpoints" / "checkpoint-4").is_dir()
    res = train_target(cfg, str(pivot), ds, str(tmp_path / "t"), str(tmp_path / "w"))
    assert res["steps"] == 10 and res["resumed_from"].endswith("checkpoint-4")
    ref, got = _params(tmp_path / "ref"), _params(tmp_path / "t")
    assert all(torch.allclose(ref[n], got[n], atol=1e-6) for n in ref)
