"""`score_batch`: the padded, row-selective scoring equals a plain full log_softmax per sequence, on
both of its paths (LM head on gathered hidden states; the model's own logits) and with Gemma-style
logit soft-capping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import PivotfuseError
from fuse.extract.score import score_batch

V, K = 300, 7


def _model(kind: str):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.5)
    if kind == "gemma2":  # soft-capped logits: tanh(x / 3) * 3, so a missed cap is visible
        return Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def _batch() -> tuple[list[list[int]], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, V, n).tolist() for n in (23, 9, 17)]
    gold = [np.array([1, 2, 3, 10, 11, 22]), np.array([8]), np.array([4, 5, 6, 7, 15, 16])]
    return seqs, gold


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_both_paths_equal_a_plain_log_softmax(kind: str) -> None:
    model = _model(kind)
    seqs, gold = _batch()
    fast = score_batch(model, seqs, gold, K, ["a", "b", "c"])
    assert model._pivotfuse_hidden_path is True  # the hidden-state path passed its self-check
    model._pivotfuse_hidden_path = False
    generic = score_batch(model, seqs, gold, K, ["a", "b", "c"])
    for seq, pos, f, g in zip(seqs, gold, fast, generic):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)[pos - 1]  # (n, V)
        ref_vals, ref_ids = lp.topk(K, dim=-1)
        for got in (f, g):
            np.testing.assert_allclose(got.topk_logprobs, ref_vals.numpy(), atol=1e-5)
            np.testing.assert_array_equal(got.topk_ids, ref_ids.numpy())
            np.testing.assert_allclose(got.gold_logprobs, lp[np.arange(len(pos)), np.asarray(seq)[pos]].numpy(),
                                       atol=1e-5)
    if kind == "gemma2":
        assert max(float(s.topk_logprobs.max()) for s in fast) > -np.log(V)  # the cap matters: not uniform


def test_nan_logits_name_the_sample() -> None:
    model = _model("llama")
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")  # NaN in column 5 of every row
    seqs, gold = _batch()
    with pytest.raises(PivotfuseError, match="sample 'first'.*NaN/inf"):
        score_batch(model, seqs, gold, K, ["first", "second", "third"])
