"""Building SFT rows, DPO pairs and WRPO triples: the gap window, same-source pairs, ties, drops."""

from __future__ import annotations

import json

import pytest

from core.config import from_dict
from core.errors import PivotfuseError
from implicit.pairs import (Candidate, PairConfig, build_preference_data, build_rows, dpo_choice, source_pair,
                            split_of, usable, wrpo_choice)
from implicit.prompts import Prompt, key

SOURCES = ["a", "b", "c"]


def cands(source, scores, texts=None):
    return [Candidate(source, i, texts[i] if texts else f"{source}{i}", s) for i, s in enumerate(scores)]


def test_gap_window_includes_both_ends_and_drops_outside():
    cfg = PairConfig(min_gap=0.01, max_gap=0.1)
    for hi, lo, want in [(0.31, 0.21, "kept"),  # 0.31 - 0.21 = 0.09999999999999998
                         (0.2, 0.1, "kept"), (0.5, 0.4, "kept"),  # 0.5 - 0.4 = 0.09999999999999998
                         (0.30, 0.29, "kept"),  # 0.010000000000000009
                         (0.5, 0.395, "gap_above_window"), (0.5, 0.495, "gap_below_window"),
                         (0.7, 0.7, "tie")]:
        pair, reason = source_pair(cands("a", [lo, hi]), cfg)
        assert reason == want, (hi, lo)
        assert (pair is not None) == (want == "kept")
        if pair:
            assert (pair[0].score, pair[1].score) == (hi, lo)


def test_pair_is_best_and_worst_of_one_source_with_ties_to_the_lowest_index():
    cfg = PairConfig(min_gap=0.0, max_gap=10.0)
    pair, _ = source_pair(cands("b", [0.2, 0.9, 0.1, 0.9, 0.1]), cfg)
    assert (pair[0].index, pair[1].index) == (1, 2)  # best 0.9 at 1 and 3 → 1; worst 0.1 at 2 and 4 → 2
    assert source_pair(cands("b", [0.5, 0.5, 0.5]), cfg) == (None, "tie")
    assert source_pair(cands("b", [0.5]), cfg) == (None, "fewer_than_two_answers")
    same = cands("b", [0.9, 0.1], texts=["same", "same"])
    assert source_pair(same, cfg) == (None, "identical_text")


def test_dpo_pairs_never_mix_sources_and_best_mode_keeps_one():
    by = {"a": cands("a", [0.60, 0.55]), "b": cands("b", [0.90, 0.10]), "c": cands("c", [0.70, 0.65])}
    cfg_all = PairConfig(min_gap=0.01, max_gap=0.1, pair_sources="all")
    pairs, outcome = dpo_choice(by, SOURCES, cfg_all)
    assert [(p[0].source, p[1].source) for p in pairs] == [("a", "a"), ("c", "c")]  # b's gap 0.8: dropped
    assert outcome == {"kept": 2, "gap_above_window": 1}
    # the best source's pair would hold the best answer overall (b, 0.9), but it lies outside the window:
    # among the pairs in the window, the one whose chosen scores highest (c, 0.70) is kept
    pairs, outcome = dpo_choice(by, SOURCES, PairConfig(min_gap=0.01, max_gap=0.1))
    assert [(p[0].source, p[0].score, p[1].score) for p in pairs] == [("c", 0.70, 0.65)]
    assert outcome == {"kept": 1, "not_best_source": 1, "gap_above_window": 1}
    # equal chosen scores: the source listed first wins
    tie = {"a": cands("a", [0.7, 0.65]), "b": cands("b", [0.7, 0.62])}
    assert dpo_choice(tie, ["b", "a"], PairConfig())[0][0][0].source == "b"
    assert dpo_choice(tie, ["a", "b"], PairConfig())[0][0][0].source == "a"


def test_usable_answers_exclude_unscored_and_blank():
    kept, dropped = usable("a", ["fine", "  ", "also", "x"], [0.5, 0.9, None, 0.1])
    assert [(c.index, c.score) for c in kept] == [(0, 0.5), (3, 0.1)]
    assert dropped == {"empty": 1, "unscored": 1}


def test_wrpo_triple_rules():
    cfg = PairConfig()
    src = cands("a", [0.3, 0.8]) + cands("b", [0.8, 0.2])
    tgt = cands("sft", [0.4, 0.6, 0.1])
    (ws, wt, lo), reason = wrpo_choice(src, tgt, SOURCES, cfg)
    assert reason == "kept" and (ws.source, ws.index) == ("a", 1)  # 0.8 tie between a1 and b0: source order
    assert (wt.index, lo.index) == (1, 2)
    assert wrpo_choice(src, cands("sft", [0.5, 0.5]), SOURCES, cfg) == (None, "target_tie")
    assert wrpo_choice(src, cands("sft", [0.5]), SOURCES, cfg) == (None, "fewer_than_two_target_answers")
    assert wrpo_choice(cands("a", [0.05]), tgt, SOURCES, cfg) == (None, "source_not_above_rejected")
    assert wrpo_choice(src, tgt, SOURCES, PairConfig(min_sft_score=0.9)) == (None, "source_below_min_score")
    assert wrpo_choice([], tgt, SOURCES, cfg) == (None, "source_no_usable_answer")


def test_split_is_deterministic_and_near_the_fraction():
    keys = [key(i) for i in range(2000)]
    parts = [split_of(k, 0.4, 7) for k in keys]
    assert parts == [split_of(k, 0.4, 7) for k in keys]
    share = parts.count("sft") / len(parts)
    assert 0.37 < share < 0.43 and set(parts) == {"sft", "preference"}
    assert parts != [split_of(k, 0.4, 8) for k in keys]
    assert split_of(keys[0], None, 7) == "both"


def test_build_rows_counts_every_drop():
    prompts = [Prompt(i, [{"role": "user", "content": f"q{i}"}]) for i in range(4)]
    cs = {key(0): {"a": cands("a", [0.50, 0.45]), "b": cands("b", [0.9, 0.89])},  # a: pair, b: pair, b best
          key(1): {"a": cands("a", [0.3, 0.3])},  # tie
          key(2): {},  # no answers at all
          key(3): {"b": cands("b", [0.1, 0.9])}}  # gap 0.8
    built = build_rows(prompts, cs, ["a", "b"], PairConfig(min_sft_score=0.2))
    assert [(r["id"], r["source"], r["completion"][0]["content"]) for r in built["sft"]] == \
        [(0, "b", "b0"), (1, "a", "a0"), (3, "b", "b1")]
    assert [(r["id"], r["source"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in built["dpo"]] == \
        [(0, "b", "b0", "b1")]
    rep = built["report"]
    assert rep["sft"] == {"rows": 3, "by_source": {"b": 2, "a": 1}, "dropped": {"no_usable_answer": 1}}
    assert rep["dpo"]["rows"] == 1 and rep["dpo"]["dropped"] == {
        "not_best_source": 1, "tie": 1, "fewer_than_two_answers": 4, "gap_above_window": 1,
        "prompts_without_pair": 3}
    assert built["wrpo"] is None and "wrpo" not in rep


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_build_from_files_and_stale_scores_are_refused(tmp_path):
    prompts = [Prompt(i, [{"role": "user", "content": f"q{i}"}]) for i in range(3)]
    for m, scores in (("a", [[0.5, 0.45], [0.2, 0.25], [0.1, 0.1]]), ("sft", [[0.4, 0.1], [0.3, 0.3], [0.9, 0.2]])):
        _write(tmp_path / "model_answer" / f"{m}.jsonl",
               [{"question_id": i, "answer_id": f"{m}{i}", "model_id": m,
                 "choices": [{"index": j, "turns": [f"{m}-{i}-{j}"]} for j in range(2)]} for i in range(3)])
        _write(tmp_path / "model_score" / "rm" / f"{m}.jsonl",
               [{"question_id": i, "answer_id": f"{m}{i}", "scores": s} for i, s in enumerate(scores)])
    rep = build_preference_data(prompts, tmp_path, "rm", ["a"], tmp_path / "data", PairConfig(), target="sft")
    dpo = [json.loads(x) for x in (tmp_path / "data" / "dpo.jsonl").read_text().splitlines()]
    wrpo = [json.loads(x) for x in (tmp_path / "data" / "wrpo.jsonl").read_text().splitlines()]
    assert [(r["id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in dpo] == \
        [(0, "a-0-0", "a-0-1"), (1, "a-1-1", "a-1-0")]
    assert [(r["id"], r["chosen"][0]["content"], r["chosen_target"][0]["content"], r["rejected"][0]["content"])
            for r in wrpo] == [(0, "a-0-0", "sft-0-0", "sft-0-1")]
    assert rep["wrpo"]["dropped"] == {"target_tie": 1, "source_not_above_rejected": 1}
    assert rep["answers"] == {"a": {"answers": 6}, "sft": {"answers": 6}}
    assert json.loads((tmp_path / "data" / "build_report.json").read_text()) == rep
    _write(tmp_path / "model_score" / "rm" / "a.jsonl", [{"question_id": 0, "answer_id": "old", "scores": [1, 0]}])
    with pytest.raises(PivotfuseError, match=r"rm/a.jsonl: no score for the current answers to question 0 of a"):
        build_preference_data(prompts, tmp_path, "rm", ["a"], tmp_path / "data", PairConfig())


def test_pair_config_checks_name_the_field():
    with pytest.raises(PivotfuseError, match=r"r.yaml: 'pairs.max_gap': must be >= min_gap"):
        from_dict(PairConfig, {"min_gap": 0.2, "max_gap": 0.1}, src="r.yaml", prefix="pairs.")
    with pytest.raises(PivotfuseError, match=r"'sft_fraction': must be in \(0, 1\)"):
        from_dict(PairConfig, {"sft_fraction": 1.0})
