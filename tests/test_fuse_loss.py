"""The sparse fusion loss against a dense naive reference (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from fuse.train.loss import fusion_loss, target_probs


def dense_reference(logits, labels, target_ids, target_logprobs, lam, temperature):
    """Plain loops: build the dense [V] target for each labelled token, then mean over tokens."""
    V = logits.shape[-1]
    total, n = 0.0, 0
    flat_logits = logits.reshape(-1, V)
    flat_labels = labels.reshape(-1)
    flat_ids = target_ids.reshape(-1, target_ids.shape[-1])
    flat_lp = target_logprobs.reshape(-1, target_ids.shape[-1])
    for t in range(flat_labels.shape[0]):
        if flat_labels[t] == -100:
            continue
        logp = torch.log_softmax(flat_logits[t].double(), -1)
        ce = -logp[flat_labels[t]]
        dense = torch.zeros(V, dtype=torch.float64)
        weights = {}
        for j in range(flat_ids.shape[1]):
            i = int(flat_ids[t, j])
            if i >= 0 and math.isfinite(float(flat_lp[t, j])):
                weights[j] = (i, math.exp(float(flat_lp[t, j]) / temperature))
        if weights:
            z = sum(w for _, w in weights.values())
            for i, w in weights.values():
                dense[i] += w / z
            kd = -(dense * logp).sum()
        else:
            kd = ce
        total = total + lam * ce + (1 - lam) * kd
        n += 1
    return total / max(n, 1)


def make_batch(B=2, L=5, V=13, k=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 0] = -100
    labels[1, -2:] = -100  # padding at the end of the second row
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(B * L)]).reshape(B, L, k).int()
    lp = torch.log_softmax(torch.randn(B, L, V, generator=g, dtype=torch.float64), -1).gather(-1, ids.long())
    ids[0, 1, 2:] = -1  # padded top-k entries
    lp[0, 1, 2:] = -math.inf
    ids[0, 2, :] = -1  # a labelled position without any target
    lp[0, 2, :] = -math.inf
    return logits, labels, ids, lp


@pytest.mark.parametrize("lam,temperature", [(0.9, 1.0), (0.5, 2.0), (0.0, 0.7), (1.0, 1.0)])
def test_loss_equals_dense_reference(lam, temperature):
    logits, labels, ids, lp = make_batch()
    out = fusion_loss(logits, labels, ids, lp, lam=lam, temperature=temperature)
    ref = dense_reference(logits, labels, ids, lp, lam, temperature)
    assert abs(out.loss.item() - float(ref)) < 1e-6
    assert out.n_tokens.item() == int((labels != -100).sum())
    assert out.n_targets.item() == out.n_tokens.item() - 1  # position (0, 2) has no target


def test_gradient_equals_dense_reference():
    logits, labels, ids, lp = make_batch(seed=3)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    fusion_loss(a, labels, ids, lp, lam=0.7, temperature=1.5).loss.backward()
    dense_reference(b, labels, ids, lp, 0.7, 1.5).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-9)
    assert torch.all(a.grad[0, 0] == 0) and torch.all(a.grad[1, -1] == 0)  # unlabelled rows get no gradient


def test_fp16_targets_and_bf16_logits_are_finite_and_close():
    logits, labels, ids, lp = make_batch(seed=5, dtype=torch.float32)
    exact = fusion_loss(logits.double(), labels, ids, lp.double()).loss.item()
    low = fusion_loss(logits.bfloat16(), labels, ids, lp.half()).loss
    assert torch.isfinite(low) and abs(low.item() - exact) < 0.05


def test_padding_never_makes_nan_even_with_inf_logits():
    logits, labels, ids, lp = make_batch(seed=1)
    logits[..., 0] = -math.inf  # id 0 is what padded entries are gathered at
    logits[labels == 0] = 0.0  # keep every gold logit finite
    ids[ids == 0] = 1
    out = fusion_loss(logits.requires_grad_(True), labels, ids, lp)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logits.grad).all()


def test_all_unlabelled_gives_connected_zero():
    logits, labels, ids, lp = make_batch()
    labels[:] = -100
    x = logits.clone().requires_grad_(True)
    out = fusion_loss(x, labels, ids, lp)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(x.grad == 0) and out.n_tokens.item() == 0


def test_lambda_one_is_plain_cross_entropy_and_num_items_scales():
    logits, labels, ids, lp = make_batch(seed=2)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    out = fusion_loss(logits, labels, ids, lp, lam=1.0)
    assert abs(out.loss.item() - ce.item()) < 1e-9
    n = int((labels != -100).sum())
    assert abs(fusion_loss(logits, labels, ids, lp, lam=1.0, num_items=2 * n).loss.item() - ce.item() / 2) < 1e-9


def test_target_probs_renormalise_with_temperature():
    ids = torch.tensor([[3, 1, -1], [-1, -1, -1]])
    lp = torch.tensor([[math.log(0.5), math.log(0.25), -math.inf], [-math.inf] * 3], dtype=torch.float64)
    p = target_probs(ids, lp, temperature=2.0)
    a, b = 0.5 ** 0.5, 0.25 ** 0.5
    assert torch.allclose(p[0], torch.tensor([a / (a + b), b / (a + b), 0.0], dtype=torch.float64))
    assert torch.all(p[1] == 0)


def test_bad_arguments():
    logits, labels, ids, lp = make_batch()
    with pytest.raises(ValueError, match="temperature"):
        fusion_loss(logits, labels, ids, lp, temperature=0)
    with pytest.raises(ValueError, match="lambda"):
        fusion_loss(logits, labels, ids, lp, lam=1.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        fusion_loss(logits, labels[:, :-1], ids, lp)


# --- the chunked loss: hidden states and the LM head's weight instead of logits -------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def head_batch(N=3, L=7, H=16, V=29, k=5, seed=0, dtype=torch.float32, device="cpu"):
    """Hidden states, an LM head and fusion targets with padded top-k entries, a labelled position
    without any target, unlabelled positions and a repeated target id."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, L, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / 2
    bias = torch.randn(V, generator=g, dtype=dtype) / 4
    labels = torch.randint(0, V, (N, L), generator=g)
    labels[0, :2] = -100
    labels[2, -3:] = -100
    ids = torch.randint(0, V, (N, L, k), generator=g).int()
    lp = torch.log_softmax(torch.randn(N, L, k, generator=g, dtype=torch.float64), -1).float()
    ids[1, 1, 3:], lp[1, 1, 3:] = -1, -math.inf  # padded entries
    ids[1, 2, :], lp[1, 2, :] = -1, -math.inf  # a labelled position with no target at all
    ids[0, 4, 1] = ids[0, 4, 0]  # a repeated id: its probabilities add up
    return [t.to(device) for t in (hidden, weight, bias, labels, ids, lp)]


def dense_head_loss(hidden, weight, bias, labels, ids, lp, scale=1.0, softcap=None, **kw):
    z = (hidden @ weight.T + bias) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return fusion_loss(z, labels, ids, lp, **kw)


def _grads(loss_fn, hidden, weight, bias):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = loss_fn(*leaves)
    out.loss.backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])  # of 16 labelled positions: exact, ragged, one chunk
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.5, 3.0)])
def test_chunked_loss_equals_the_dense_loss_values_and_gradients(device, chunk, scale, softcap):
    from fuse.train.loss import chunked_fusion_loss

    hidden, weight, bias, labels, ids, lp = head_batch(device=device)
    assert int((labels != -100).sum()) == 16
    kw = dict(lam=0.7, temperature=1.5, num_items=20)
    ref, ref_g = _grads(lambda h, w, b: dense_head_loss(h, w, b, labels, ids, lp, scale, softcap, **kw),
                        hidden, weight, bias)
    got, got_g = _grads(lambda h, w, b: chunked_fusion_loss(h, w, labels, ids, lp, bias=b, chunk_size=chunk,
                                                            scale=scale, softcap=softcap, **kw), hidden, weight, bias)
    for a, b in ((got.loss, ref.loss), (got.ce_sum, ref.ce_sum), (got.kd_sum, ref.kd_sum)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (a, b)
    assert got.n_tokens.item() == ref.n_tokens.item() == 16 and got.n_targets.item() == ref.n_targets.item() == 15
    for name, a, b in zip(("hidden", "weight", "bias"), got_g, ref_g):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name, (a - b).abs().max())
    assert torch.all(got_g[0][0, :2] == 0) and torch.all(got_g[0][2, -3:] == 0)  # unlabelled: no gradient


def test_chunked_loss_in_float64_equals_the_naive_reference():
    from fuse.train.loss import chunked_fusion_loss

    hidden, weight, bias, labels, ids, lp = head_batch(seed=4, dtype=torch.float64)
    for lam, temperature in ((0.9, 1.0), (0.0, 0.7), (1.0, 1.0)):
        got = chunked_fusion_loss(hidden, weight, labels, ids, lp.double(), lam, temperature, bias=bias, chunk_size=3)
        ref = dense_reference(hidden @ weight.T + bias, labels, ids, lp.double(), lam, temperature)
        assert abs(got.loss.item() - float(ref)) < 1e-10


def test_chunked_loss_all_unlabelled_is_a_connected_zero():
    from fuse.train.loss import chunked_fusion_loss

    hidden, weight, bias, labels, ids, lp = head_batch()
    labels[:] = -100
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = chunked_fusion_loss(h, w, labels, ids, lp)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.n_tokens.item() == 0 and torch.all(h.grad == 0) and torch.all(w.grad == 0)


def test_chunked_loss_under_bf16_autocast_is_close_to_float32():
    from fuse.train.loss import chunked_fusion_loss

    hidden, weight, bias, labels, ids, lp = head_batch(seed=2)
    exact = chunked_fusion_loss(hidden, weight, labels, ids, lp, chunk_size=4).loss.item()
    w = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = chunked_fusion_loss(hidden, w, labels, ids, lp, chunk_size=4).loss
    low.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
    assert abs(low.item() - exact) < 0.05 * abs(exact)


def test_chunked_loss_bad_arguments():
    from fuse.train.loss import chunked_fusion_loss

    hidden, weight, bias, labels, ids, lp = head_batch()
    with pytest.raises(ValueError, match="temperature"):
        chunked_fusion_loss(hidden, weight, labels, ids, lp, temperature=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        chunked_fusion_loss(hidden[:, :-1], weight, labels, ids, lp)
