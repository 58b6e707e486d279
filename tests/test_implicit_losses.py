"""Preference losses and the α schedule against naive scalar formulas: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from implicit.losses import dpo_loss, wrpo_alpha, wrpo_loss

# hand-made sequence log-probs of 4 examples: policy and reference, chosen/rejected (and target's chosen)
PC = [-12.5, -30.0, -7.25, -3.0]
PR = [-14.0, -25.5, -9.0, -3.5]
RC = [-13.0, -28.0, -7.0, -4.0]
RR = [-13.5, -26.0, -8.0, -3.25]
PT = [-10.0, -22.0, -6.5, -2.0]
RT = [-10.5, -21.0, -6.0, -2.75]
LC, LR, LT = [5, 12, 3, 1], [7, 9, 4, 2], [4, 10, 3, 1]


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def naive_dpo(pc, pr, rc, rr, beta, lc=None, lr=None):
    rw, rl = pc - rc, pr - rr
    if lc is not None:
        rw, rl = rw / lc, rl / lr
    return -_logsig(beta * (rw - rl))


def naive_wrpo(ps, pt, pl, rs, rt, rl, beta, alpha, ls=None, lt=None, ll=None):
    ws, wt, lo = ps - rs, pt - rt, pl - rl
    if ls is not None:
        ws, wt, lo = ws / ls, wt / lt, lo / ll
    return -_logsig(beta * (alpha * ws + (1 - alpha) * wt - lo))


def _t(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _numeric_grad(f, args, i, j, h=1e-6):
    """d f(args) / d args[i][j] by central differences."""
    up = [list(a) for a in args]
    dn = [list(a) for a in args]
    up[i][j] += h
    dn[i][j] -= h
    return (f(*up) - f(*dn)) / (2 * h)


@pytest.mark.parametrize("beta,normalise", [(0.1, False), (10.0, True), (2.5, False), (0.01, True)])
def test_dpo_loss_values_and_gradients_match_the_formula(beta, normalise):
    pc, pr, rc, rr = _t(PC), _t(PR), _t(RC), _t(RR)
    lens = (torch.tensor(LC), torch.tensor(LR)) if normalise else (None, None)
    loss = dpo_loss(pc, pr, rc, rr, beta, *lens)
    want = [naive_dpo(*v, beta, *((LC[i], LR[i]) if normalise else ())) for i, v in enumerate(zip(PC, PR, RC, RR))]
    assert loss.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    loss.sum().backward()

    def total(a, b, c, d):
        return sum(naive_dpo(a[i], b[i], c[i], d[i], beta, *((LC[i], LR[i]) if normalise else ())) for i in range(4))

    for k, t in enumerate((pc, pr, rc, rr)):
        numeric = [_numeric_grad(total, (PC, PR, RC, RR), k, j) for j in range(4)]
        assert t.grad.tolist() == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_length_normalised_dpo_is_plain_dpo_on_per_token_rewards():
    loss = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), 10.0, torch.tensor(LC), torch.tensor(LR))
    per_token = dpo_loss(_t([p / n for p, n in zip(PC, LC)]), _t([p / n for p, n in zip(PR, LR)]),
                         _t([p / n for p, n in zip(RC, LC)]), _t([p / n for p, n in zip(RR, LR)]), 10.0)
    assert torch.allclose(loss, per_token)
    with pytest.raises(ValueError, match="both lengths"):
        dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), 1.0, torch.tensor(LC), None)


@pytest.mark.parametrize("alpha,normalise", [(0.0, False), (0.1, False), (0.37, True), (1.0, False)])
def test_wrpo_loss_values_and_gradients_match_the_formula(alpha, normalise):
    beta = 0.5
    tensors = [_t(v) for v in (PC, PT, PR, RC, RT, RR)]
    lengths = tuple(torch.tensor(v) for v in (LC, LT, LR)) if normalise else None
    loss = wrpo_loss(*tensors, beta=beta, alpha=alpha, lengths=lengths)

    def one(i, vals):
        extra = (LC[i], LT[i], LR[i]) if normalise else ()
        return naive_wrpo(*vals, beta, alpha, *extra)

    want = [one(i, v) for i, v in enumerate(zip(PC, PT, PR, RC, RT, RR))]
    assert loss.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    loss.sum().backward()

    def total(*arrays):
        return sum(one(i, [a[i] for a in arrays]) for i in range(4))

    for k, t in enumerate(tensors):
        numeric = [_numeric_grad(total, (PC, PT, PR, RC, RT, RR), k, j) for j in range(4)]
        assert t.grad.tolist() == pytest.approx(numeric, rel=1e-6, abs=1e-9)
    if alpha == 0.0:  # the source answer gets no gradient at α = 0
        assert torch.all(tensors[0].grad == 0) and torch.all(tensors[3].grad == 0)


def test_wrpo_at_the_ends_of_alpha_is_dpo_on_one_chosen_answer():
    args = [_t(v) for v in (PC, PT, PR, RC, RT, RR)]
    ps, pt, pl, rs, rt, rl = args
    assert torch.allclose(wrpo_loss(*args, beta=0.3, alpha=0.0), dpo_loss(pt, pl, rt, rl, 0.3))
    assert torch.allclose(wrpo_loss(*args, beta=0.3, alpha=1.0), dpo_loss(ps, pl, rs, rl, 0.3))
    with pytest.raises(ValueError, match="alpha must be in"):
        wrpo_loss(*args, beta=0.3, alpha=1.5)


def test_alpha_rises_linearly_from_zero_to_alpha_max():
    steps = [wrpo_alpha(s, 11, 0.1) for s in range(11)]
    assert steps == pytest.approx([0.01 * s for s in range(11)], abs=1e-15)
    assert steps[0] == 0.0 and steps[-1] == pytest.approx(0.1)
    assert wrpo_alpha(15, 11, 0.1) == pytest.approx(0.1)  # past the end: stays at α_max
    assert wrpo_alpha(0, 0, 0.1) == 0.0  # before training (max_steps unknown)
    assert [wrpo_alpha(s, 1, 0.2) for s in (0, 1)] == [0.0, 0.2]
    diffs = [b - a for a, b in zip(steps, steps[1:])]
    assert max(diffs) - min(diffs) < 1e-12  # linear
