"""Merge methods as pure tensor functions: each against the plain formula, on slices and threads."""

from __future__ import annotations

import pytest
import torch

from merge import methods, parallel
from merge.config import METHOD_NAMES
from merge.methods import MethodArgs
from merge.parallel import compute_threads
from merge.select import Scores, population_variance, radix_topk_mask, topk_mask, variance_scores
from test_merge_fixtures import ULPS, ref_linear, ref_sce, ref_task_arithmetic, ref_ties, ref_varm


@pytest.fixture(params=[(1, None), (2, 97)], ids=["1thread", "2threads-small-slices"])
def slicing(request, monkeypatch):
    """Run each test once plainly and once on 2 threads with tiny slices (many slice boundaries)."""
    threads, chunk = request.param
    if chunk:
        monkeypatch.setattr(parallel, "CHUNK", chunk)
    with compute_threads(threads):
        yield


def _family(shape=(24, 40), k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(shape, generator=g)
    ts = []
    for i in range(k):
        delta = (1 + i) * 1e-3 * torch.randn(shape, generator=g)
        delta[torch.rand(shape, generator=g) < 0.1] = 0
        ts.append(base + delta)
    return base, ts


def _run(name, base, ts, **kw):
    args = MethodArgs(weights=tuple(kw.pop("weights", [1.0] * len(ts))), **kw)
    return methods.METHODS[name](base.clone(), torch.stack(ts), args)


def test_registry_matches_config_names():
    assert set(methods.METHODS) == set(METHOD_NAMES)


def test_population_variance_is_bit_identical_to_torch_var(slicing):
    g = torch.Generator().manual_seed(1)
    for k in (1, 2, 3, 5):
        x = torch.randn(k, 1000, generator=g) * 1e-3
        x[:, :10] = 0.25  # equal columns: exactly zero variance
        assert torch.equal(population_variance(x), torch.var(x, dim=0, unbiased=False))


def test_topk_mask_selects_exactly_k_largest():
    v = torch.tensor([0.5, 0.1, 0.9, 0.5, 0.3, 0.5])
    assert topk_mask(v, 2).tolist() == [True, False, True, False, False, False]  # tie: lowest index
    assert topk_mask(v, 3).tolist() == [True, False, True, True, False, False]
    assert topk_mask(v, 0).sum() == 0 and topk_mask(v, 6).all() and topk_mask(v, 99).all()
    r = torch.rand(5000)
    assert torch.equal(topk_mask(r, 700).nonzero().view(-1), torch.topk(r, 700).indices.sort().values)


def test_variance_scores_select_exactly_mergekits_elements(slicing):
    g = torch.Generator().manual_seed(2)
    for k in (2, 3, 5):
        d = torch.randn(k, 30000, generator=g) * 1e-3
        d[:, :500] = 0.125  # equal columns: zero variance, never counted
        var = torch.var(d, dim=0, unbiased=False)
        scores = variance_scores(k, d.shape[1], lambda s, e: d[:, s:e], lambda idx: d[:, idx])
        est = torch.cat([scores.part(s, e) for s, e in parallel.spans(scores.n)]) / scores.scale
        nz = var != 0
        assert torch.equal(est != 0, nz)
        assert float(((est[nz] - var[nz]).abs() / var[nz]).max()) <= scores.rel_err / 2
        for top in (0.01, 0.1, 0.5):
            count = int(torch.count_nonzero(var) * top)
            expected = torch.zeros(var.numel(), dtype=torch.bool)
            expected[torch.topk(var, count).indices] = True
            assert torch.equal(topk_mask(scores, count), expected)
            assert torch.equal(topk_mask(scores, share=top), expected)  # k counted in the same pass
    flat = torch.full((3, 100), 0.5)
    scores = variance_scores(3, 100, lambda s, e: flat[:, s:e], lambda idx: flat[:, idx])
    assert not topk_mask(scores, share=0.1).any()  # no variance: nothing selected


def test_topk_mask_falls_back_to_exact_selection_when_estimates_mislead():
    v = torch.rand(5000, generator=torch.Generator().manual_seed(3))
    liar = Scores(v.numel(), lambda s, e: torch.zeros(e - s), lambda idx: v[idx])  # claims rel_err 0
    assert torch.equal(topk_mask(liar, 321), topk_mask(v, 321))
    assert int(topk_mask(liar, 321).sum()) == 321


def test_radix_selection_handles_signs_and_ties():
    v = torch.tensor([-1.0, 3.0, -0.5, 3.0, 0.0, 2.0, 3.0, -7.0])
    assert radix_topk_mask(v, 2).tolist() == [False, True, False, True, False, False, False, False]
    assert radix_topk_mask(v, 5).tolist() == [False, True, False, True, True, True, True, False]
    assert radix_topk_mask(v, 7).tolist() == [True, True, True, True, True, True, True, False]
    r = torch.randn(20000)
    assert torch.equal(radix_topk_mask(r, 999).nonzero().view(-1), torch.topk(r, 999).indices.sort().values)


def test_varm_matches_formula(slicing):
    base, ts = _family()
    res = _run("varm", base, ts)
    torch.testing.assert_close(res.tensor, ref_varm(base, ts), **ULPS)
    ms = [float(((t - base) ** 2).mean()) for t in ts]
    assert res.weights == pytest.approx([m / sum(ms) for m in ms], rel=1e-6)


def test_varm_uniform_when_nothing_moved():
    base, _ = _family()
    res = _run("varm", base, [base.clone(), base.clone()])
    assert res.weights == [0.5, 0.5] and torch.equal(res.tensor, base)


@pytest.mark.parametrize("semantics", ["mergekit", "fusechat"])
@pytest.mark.parametrize("topk", [0.1, 0.5, 1.0])
def test_sce_matches_formula(slicing, semantics, topk):
    base, ts = _family()
    res = _run("sce", base, ts, select_topk=topk, sce_mask=semantics)
    torch.testing.assert_close(res.tensor, ref_sce(base, ts, topk, semantics), **ULPS)


def test_sce_semantics_differ_only_when_selecting():
    base, ts = _family(seed=3)
    a = _run("sce", base, ts, select_topk=0.1, sce_mask="mergekit").tensor
    b = _run("sce", base, ts, select_topk=0.1, sce_mask="fusechat").tensor
    # mergekit's mask leaves ~90% of elements at the base; the fork moves almost all of them
    assert (a == base).float().mean() > 0.85 and (b == base).float().mean() < 0.2
    assert torch.equal(_run("sce", base, ts, select_topk=1.0, sce_mask="mergekit").tensor,
                       _run("sce", base, ts, select_topk=1.0, sce_mask="fusechat").tensor)


def test_sce_mergekit_uniform_weights_below_threshold():
    # mergekit 0.1.5 falls back to uniform weights when Σ mean(τ²) < 1e-6 (tiny fine-tune deltas)
    base, ts = _family()
    small = [base + 1e-4 * (t - base) for t in ts]
    res = _run("sce", base, small, select_topk=1.0, sce_mask="mergekit")
    assert res.weights == pytest.approx([1 / 3] * 3)
    assert _run("sce", base, small, select_topk=1.0, sce_mask="fusechat").weights != pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_formula(slicing, normalize):
    base, ts = _family()
    w = [1.0, 0.5, 2.0]
    res = _run("linear", base, ts, weights=w, normalize=normalize)
    torch.testing.assert_close(res.tensor, ref_linear(ts, w, normalize), **ULPS)


def test_task_arithmetic_matches_formula(slicing):
    base, ts = _family()
    w = [1.0, 0.5, -0.3]
    res = _run("task_arithmetic", base, ts, weights=w, normalize=False, scale=0.7)
    torch.testing.assert_close(res.tensor, ref_task_arithmetic(base, ts, w, 0.7), **ULPS)


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties_matches_formula(slicing, density):
    base, ts = _family()
    w = [1.0, 0.6, 0.8]
    res = _run("ties", base, ts, weights=w, density=density, normalize=True)
    torch.testing.assert_close(res.tensor, ref_ties(base, ts, w, density), **ULPS)
    if density < 1:
        assert all(k <= density + 1e-9 for k in res.kept)


def test_dare_is_seeded_per_tensor_and_independent_of_threads(monkeypatch):
    base, ts = _family(shape=(64, 50))
    monkeypatch.setattr(parallel, "CHUNK", 97)  # many slices, each with its own generator
    runs = []
    for threads in (1, 2):
        with compute_threads(threads):
            runs.append(_run("dare_ties", base, ts, density=0.4, seed=7, key="w").tensor)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], _run("dare_ties", base, ts, density=0.4, seed=7, key="w").tensor)
    assert not torch.equal(runs[0], _run("dare_ties", base, ts, density=0.4, seed=8, key="w").tensor)
    assert not torch.equal(runs[0], _run("dare_ties", base, ts, density=0.4, seed=7, key="v").tensor)


@pytest.mark.parametrize("name, kw", [
    ("varm", {}), ("sce", {"select_topk": 0.1}), ("sce", {"select_topk": 0.1, "sce_mask": "fusechat"}),
    ("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 0.4}),
    ("dare_ties", {"density": 0.4, "seed": 7}), ("dare_linear", {"density": 0.4, "rescale": "l1", "seed": 7}),
])
def test_every_method_is_bit_identical_on_any_thread_count(monkeypatch, name, kw):
    # the README's "merges repeat bit for bit whatever the thread count": fixed slices, each on
    # single-threaded kernels, partial results combined in slice order
    base, ts = _family(shape=(64, 50))
    monkeypatch.setattr(parallel, "CHUNK", 97)  # many slices, so two threads really share the work
    runs = []
    for threads in (1, 2, 3):
        with compute_threads(threads):
            res = _run(name, base, ts, weights=[1.0, 0.6, 0.8], key="w", **kw)
            runs.append((res.tensor, res.weights, res.kept))
    assert all(torch.equal(runs[0][0], t) and runs[0][1:] == (w, k) for t, w, k in runs[1:])


@pytest.mark.parametrize("rescale", ["inverse", "l1", "none"])
def test_dare_linear_drops_and_rescales(rescale):
    base, ts = _family(shape=(200, 100), k=1)
    tau = ts[0] - base
    res = _run("dare_linear", base, ts, density=0.3, rescale=rescale, seed=1, key="x")
    moved = res.tensor - base
    kept = moved != 0
    share = kept.sum() / (tau != 0).sum()
    assert abs(float(share) - 0.3) < 0.01  # Bernoulli(0.3) over ~19k elements
    factor = {"inverse": 1 / 0.3, "none": 1.0,
              "l1": float(tau.abs().sum() / (tau * kept).abs().sum())}[rescale]
    torch.testing.assert_close(moved, tau * kept * factor, rtol=1e-5, atol=1e-8)


def test_dare_with_full_density_is_plain(slicing):
    base, ts = _family()
    w = [1.0, 0.5, 0.25]
    torch.testing.assert_close(_run("dare_linear", base, ts, weights=w, density=1.0, normalize=False).tensor,
                               ref_task_arithmetic(base, ts, w), **ULPS)
    torch.testing.assert_close(_run("dare_ties", base, ts, weights=w, density=1.0, normalize=True).tensor,
                               ref_ties(base, ts, w, 1.0), **ULPS)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_methods_handle_scalars_and_single_models(name):
    # one model, weight 1, nothing dropped: every method returns that model
    res = _run(name, torch.tensor(0.5), [torch.tensor(0.75)], density=1.0, select_topk=1.0)
    assert res.tensor.shape == () and float(res.tensor) == 0.75


@pytest.mark.parametrize("name, kw", [
    ("varm", {}), ("sce", {"select_topk": 0.2}), ("sce", {"select_topk": 0.2, "sce_mask": "fusechat"}),
    ("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 0.4}),
    ("dare_ties", {"density": 0.4, "rescale": "l1"}), ("dare_linear", {"density": 0.4}),
])
def test_half_precision_inputs_give_the_float32_result(slicing, name, kw):
    # bf16 inputs stay bf16 in memory and are converted slice by slice; the maths must not change
    base, ts = _family(shape=(40, 33))
    base, ts = base.bfloat16(), [t.bfloat16() for t in ts]
    args = MethodArgs(weights=(1.0, 0.5, 0.8), key="w", **kw)
    fn = methods.METHODS[name]
    lazy = fn(base.clone(), torch.stack(ts), args, torch.empty(base.shape)).tensor
    eager = fn(base.float(), torch.stack(ts).float(), args).tensor
    assert lazy.dtype == eager.dtype == torch.float32 and torch.equal(lazy, eager)
    into_base = fn(base.clone(), torch.stack(ts), args).tensor  # output written over the bf16 base
    assert into_base.dtype == torch.bfloat16 and torch.equal(into_base, eager.bfloat16())
