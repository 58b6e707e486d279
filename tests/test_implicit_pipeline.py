"""The phases chained through their files on tiny models: sample → score (reward model) → build →
SFT → sample the SFT model → score → WRPO triples → DPO and WRPO."""

from __future__ import annotations

import json
import math
import random

import pytest

from implicit.config import DPOTrainConfig, SampleConfig, ScoreConfig, SFTTrainConfig, WRPOTrainConfig
from implicit.pairs import PairConfig, build_preference_data
from implicit.prompts import Prompt
from implicit.sample import sample_answers
from implicit.score import score_answers
from implicit.train import train_dpo, train_sft, train_wrpo
from implicit_helpers import sentence, tiny_chat_model

pytestmark = pytest.mark.slow


def test_phases_chain_through_their_files(tmp_path):
    sources = {name: tiny_chat_model(tmp_path / name, seed=s) for name, s in (("s1", 1), ("s2", 2))}
    target = tiny_chat_model(tmp_path / "target", seed=3)
    rm = tiny_chat_model(tmp_path / "rm", seed=4, classifier=True)
    rng = random.Random(0)
    prompts = [Prompt(f"p{i}", [{"role": "user", "content": sentence(rng)}]) for i in range(12)]
    out = tmp_path / "samples"
    sample = SampleConfig(n=3, temperature=1.0, top_p=1.0, max_new_tokens=8, dtype="float32", chunk_prompts=6)
    for name, path in sources.items():
        sample_answers(prompts, f"{name}={path}", out, sample)
    score = ScoreConfig(scorer="reward_model", reward_model=f"rm={rm}", dtype="float32")
    score_answers(prompts, out, list(sources), score)
    wide = PairConfig(min_gap=0.0, max_gap=100.0)  # a random reward model's scores: keep every untied pair
    report = build_preference_data(prompts, out, "rm", list(sources), tmp_path / "data", wide)
    assert report["sft"]["rows"] == 12 and report["dpo"]["rows"] == 12  # continuous scores: no ties
    assert report["dpo"]["dropped"] == {"not_best_source": 12}  # both sources had a pair: one kept per prompt
    sft_rows = [json.loads(x) for x in (tmp_path / "data" / "sft.jsonl").read_text().splitlines()]
    answers = {m: {json.loads(x)["question_id"]: json.loads(x) for x in (out / "model_answer" / f"{m}.jsonl")
                   .read_text().splitlines()} for m in sources}
    scores = {m: {json.loads(x)["question_id"]: json.loads(x)["scores"] for x in (out / "model_score" / "rm" /
              f"{m}.jsonl").read_text().splitlines()} for m in sources}
    for row in sft_rows:  # the SFT answer is the best-scored of all six
        allc = [(s, a["turns"][0]) for m in sources
                for s, a in zip(scores[m][row["id"]], answers[m][row["id"]]["choices"])]
        assert row["score"] == max(s for s, _ in allc) and row["completion"][0]["content"] in {t for _, t in allc}

    fast = dict(max_steps=4, batch_size=4, warmup=0, logging_steps=2, lr=1e-2)
    sft = train_sft(str(target), tmp_path / "data" / "sft.jsonl", tmp_path / "sft", SFTTrainConfig(**fast))
    assert sft["loss_after"] < sft["loss_before"]
    sample_answers(prompts, f"sft={tmp_path / 'sft'}", out, sample)
    score_answers(prompts, out, ["sft"], score)
    report = build_preference_data(prompts, out, "rm", list(sources), tmp_path / "data", wide, target="sft")
    assert report["wrpo"]["rows"] + sum(report["wrpo"]["dropped"].values()) == 12
    assert report["wrpo"]["rows"] > 0
    dpo = train_dpo(str(tmp_path / "sft"), tmp_path / "data" / "dpo.jsonl", tmp_path / "dpo",
                    DPOTrainConfig(beta=1.0, **fast))
    wrpo = train_wrpo(str(tmp_path / "sft"), tmp_path / "data" / "wrpo.jsonl", tmp_path / "wrpo",
                      WRPOTrainConfig(beta=1.0, alpha_max=0.5, **fast))
    for res in (dpo, wrpo):
        assert res["loss_before"] == pytest.approx(math.log(2), abs=1e-6) and res["loss_after"] < res["loss_before"]
