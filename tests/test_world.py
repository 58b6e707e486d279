"""The demo world: deterministic, loadable offline, heterogeneous, with the expertise structure fusion needs."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.chat import load_conversations, render_chat
from core.errors import PivotfuseError
from world.build import build_world
from world.config import WorldConfig
from evals.accuracy import check_answer, competitor_keys
from world.corpus import DOMAINS, SKILLS, FactTable, make_corpus, question_key, questions
from world.corpus import check_answer as corpus_check
from world.train import loss_per_char

MODELS = ("pivot", "arith", "facts", "strings")
TINY = dict(n_source_train=12, n_general=12, n_fusion=4, n_heldout=4, n_valid=3, train_steps=2, batch_size=4)


def test_corpus_deterministic_checkable_and_split():
    a, b = make_corpus(3, 30, 30, 10, 10, 8), make_corpus(3, 30, 30, 10, 10, 8)
    assert [c.messages for c in a["fusion"]] == [c.messages for c in b["fusion"]]
    assert [c.messages for c in make_corpus(4, 30, 30, 10, 10, 8)["fusion"]] != [c.messages for c in a["fusion"]]
    assert {c.domain for c in a["source_train"]} == set(SKILLS)
    assert {c.domain for c in a["heldout"]} == set(DOMAINS) == {c.domain for c in a["fusion"]} \
        == {c.domain for c in a["valid"]}
    assert {c.domain for c in a["general"]} == {"chat"}
    assert len(a["valid"]) == 8 * len(DOMAINS) and len(a["heldout"]) == 10 * len(DOMAINS)
    assert any(len(c.messages) == 4 for c in a["fusion"])  # multi-turn present
    table = FactTable.make(random.Random("facts-3"))
    checked = 0
    rivals = competitor_keys(questions([c for split in a.values() for c in split]))
    for chat in (c for split in a.values() for c in split):
        assert len(chat.answers) == len(chat.messages) // 2
        assert corpus_check(chat, 3)  # the world's own check (implicit's verifier), turn by turn
        others = rivals.get(chat.domain, [])
        context: tuple = ()
        for q, r, key in zip(chat.messages[0::2], chat.messages[1::2], chat.answers):
            if chat.domain == "chat":  # the key is every fitting reply
                assert r["content"] in key and check_answer(r["content"], key, q["content"], others)
                continue
            want, context = question_key(chat.domain, q["content"], context, table)  # read from the text
            assert key == want, (chat, q)
            assert check_answer(r["content"], key, q["content"], others), (q, r, key)  # the reply states it
            checked += 1
    assert checked > 100
    # the checks are not vacuous: a wrong sum, a fact of another country, a follow-up that forgets
    bad = next(c for c in a["source_train"] if c.domain == "arith")
    assert not check_answer("It is 100000.", bad.answers[0], bad.messages[0]["content"])
    bad.messages[1]["content"] = "It is 100000."
    assert not corpus_check(bad, 3)
    fact = next(c for c in a["source_train"] if c.domain == "facts" and len(c.messages) == 4)
    other = next(r for r in table.rows if r["capital"] not in fact.answers and r["animal"] not in fact.answers
                 and r["color"] not in fact.answers)
    asked = fact.messages[2]["content"]  # "And its capital?": the same country, named only by "its"
    attr = "capital" if "capital" in asked else "color" if "flag" in asked else "animal"
    fact.messages[3]["content"] = f"It is {other[attr]}."
    assert not corpus_check(fact, 3)
    word = next(c for c in a["source_train"] if c.domain == "strings" and len(c.messages) == 4
                and "same" in c.messages[2]["content"])
    word.messages[3]["content"] = "It is 'zzz'."
    assert not corpus_check(word, 3)


def test_trained_tokenizers_split_digits_and_spell_words():
    """The byte-level BPE gives one token per digit (column arithmetic), the strings model's
    Unigram spells a quoted word letter by letter; both are the same on every training (the
    Unigram trainer is multi-threaded: without rounding and sorting its pieces it is not)."""
    from world.build import _tokenizer_texts
    from world.tokenizers import byte_bpe_tokenizer, unigram_tokenizer

    texts = _tokenizer_texts(make_corpus(0, 300, 300, 16, 6, 6))
    bpe = byte_bpe_tokenizer(texts["all"], 2000)
    assert bpe.convert_ids_to_tokens(bpe("23 + 58 = 181")["input_ids"]) == [
        "2", "3", "Ġ+", "Ġ", "5", "8", "Ġ=", "Ġ", "1", "8", "1"]
    unigrams = [unigram_tokenizer(texts["no_strings"], 400, spell_inside_words=True) for _ in range(3)]
    assert len({u.backend_tokenizer.to_str() for u in unigrams}) == 1
    assert unigrams[0].tokenize("Reverse 'lantern'.")[-10:] == ["'", "l", "a", "n", "t", "e", "r", "n", "'", "."]


def test_length_grouped_batches_cover_each_epoch_and_pad_little():
    """Every chat once per epoch, batches of similar lengths, the same order from the same seed."""
    from world.train import length_grouped_batches

    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(1000)]
    gen = length_grouped_batches(lengths, 16, random.Random(1))
    epoch = [next(gen) for _ in range(63)]  # 1000 = 62 batches of 16 + one of 8
    assert sorted(i for b in epoch for i in b) == list(range(1000))
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in epoch)
    naive = [list(range(k, min(k + 16, 1000))) for k in range(0, 1000, 16)]  # arbitrary order, no grouping
    naive_pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in naive)
    assert pad < naive_pad / 5, (pad, naive_pad)
    again = length_grouped_batches(lengths, 16, random.Random(1))
    assert [next(again) for _ in range(63)] == epoch


def _digest(out) -> tuple:
    meta = json.loads((out / "world.json").read_text())
    data = tuple((out / "data" / f"{s}.jsonl").read_bytes()
                 for s in ("source_train", "general", "fusion", "valid", "heldout", "heldout_questions"))
    return tuple(m["sha256"] for m in meta["models"]), data


def test_world_is_deterministic_and_cached(tmp_path, assets):
    a = build_world(WorldConfig(out=str(tmp_path / "a"), **TINY), assets=assets, progress=False)
    b = build_world(WorldConfig(out=str(tmp_path / "b"), **TINY), assets=assets, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert a["fingerprint"] == b["fingerprint"]
    c = build_world(WorldConfig(out=str(tmp_path / "c"), seed=1, **TINY), assets=assets, progress=False)
    assert c["fingerprint"] != a["fingerprint"] and _digest(tmp_path / "c") != _digest(tmp_path / "a")
    # a rerun with the same settings reuses the folder untouched
    stamp = os.stat(tmp_path / "a" / "models" / "pivot" / "model.safetensors").st_mtime_ns
    build_world(WorldConfig(out=str(tmp_path / "a"), **TINY), assets=assets, progress=False)
    assert os.stat(tmp_path / "a" / "models" / "pivot" / "model.safetensors").st_mtime_ns == stamp


def test_world_models_are_heterogeneous_and_load_offline(world):
    types, vocabs, templates, kinds = set(), set(), set(), set()
    conv = load_conversations(world / "data" / "heldout.jsonl")[0]
    for name in MODELS:
        folder = world / "models" / name
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        assert list(folder.glob("*.safetensors")) and (folder / "tokenizer_config.json").is_file()
        assert tok.chat_template, f"{name} has no chat template"
        r = render_chat(tok, conv.messages)
        assert all(r.text[s:e].startswith(m["content"].strip()) for (s, e), m in
                   zip(r.assistant_spans, [m for m in conv.messages if m["role"] == "assistant"]))
        types.add(model.config.model_type)
        vocabs.add(len(tok))
        templates.add(tok.chat_template)
        pieces = "".join(tok.convert_ids_to_tokens(tok(" hello world")["input_ids"]))
        kinds.add("Ġ" if "Ġ" in pieces else "▁" if "▁" in pieces else "?")
        # it generates
        prompt = tok.apply_chat_template(conv.messages[:1], add_generation_prompt=True, tokenize=False)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids["input_ids"].shape[1]
    assert len(types) >= 3 and len(templates) >= 3 and len(vocabs) >= 3 and kinds == {"Ġ", "▁"}
    assert 32000 in vocabs  # the real Llama-2 vocabulary


def test_saved_tokenizers_reload_faithfully(world, tokenizer_dirs):
    """A folder's tokenizer must tokenise exactly like the one it was saved from (transformers
    may pick a tokenizer class by model type); facts carries the real Llama-2 tokenizer."""
    text = "Hello world!\n  Reverse 'apple': elppa. 12 x 7 = 84\tdone"
    real = AutoTokenizer.from_pretrained(tokenizer_dirs["llama2"])
    facts = AutoTokenizer.from_pretrained(world / "models" / "facts")
    assert facts(text)["input_ids"] == real(text)["input_ids"]
    for name in ("pivot", "arith", "strings"):
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(world / "models" / name / "tokenizer.json"))
        tok = AutoTokenizer.from_pretrained(world / "models" / name)
        assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids


@torch.no_grad()
def test_each_source_is_the_expert_of_its_domain(world):
    heldout = load_conversations(world / "data" / "heldout.jsonl")
    loss = {}
    for name in MODELS:
        folder = world / "models" / name
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        for d in SKILLS:
            loss[name, d] = loss_per_char(model, tok, [c for c in heldout if c.domain == d])
    for d in SKILLS:
        assert loss[d, d] < loss["pivot", d], (d, loss)
        assert loss[d, d] == min(loss[m, d] for m in MODELS), (d, loss)  # the expert is the best on its domain
    meta = json.loads((world / "world.json").read_text())
    recorded = {m["name"]: m["heldout_nats_per_char"] for m in meta["models"]}
    for (name, d), v in loss.items():
        assert v == pytest.approx(recorded[name][d], abs=1e-3)


def test_world_out_refuses_a_file_or_a_foreign_folder_before_any_work(tmp_path):
    """`world --out` never deletes what is not a world, and says so before building anything."""
    from cli import main

    f = tmp_path / "notes.txt"
    f.write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine too")
    for out, why in ((f, "is a file"), (mine, "not a demo world")):
        with pytest.raises(PivotfuseError, match=why):
            build_world(WorldConfig(out=str(out), **TINY), progress=False)
        assert main(["world", "--out", str(out)]) == 2
    assert f.read_text() == "mine" and (mine / "keep.txt").read_text() == "mine too"
    assert not (tmp_path / "mine.tmp").exists() and not (tmp_path / "notes.txt.tmp").exists()


@pytest.mark.slow
def test_experts_answer_their_domain_and_the_pivot_does_not(world, tmp_path):
    """Greedy held-out accuracy, measured afresh by `eval accuracy`: each source is right on
    at least 80% of its domain's answer turns, the pivot at least 40 points below each expert
    there, and fine at chat; world.json recorded the same numbers at build time."""
    from evals.accuracy import answer_accuracy
    from evals.config import EvalConfig
    from world.build import ANSWER_TOKENS

    cfg = EvalConfig(out=str(tmp_path), batch_size=64, dtype="float32", max_new_tokens=ANSWER_TOKENS)
    table = answer_accuracy({m: str(world / "models" / m) for m in MODELS}, world / "data" / "heldout_questions.jsonl",
                            cfg, progress=False)
    acc = {m: {d: table[m][d]["accuracy"] for d in DOMAINS} for m in MODELS}
    for d in SKILLS:
        assert table[d][d]["total"] >= 50, table[d][d]  # enough turns for the percentages to mean something
        assert acc[d][d] >= 0.8, (d, acc)
        assert acc["pivot"][d] <= acc[d][d] - 0.4, (d, acc)
    assert acc["pivot"]["chat"] >= 0.8, acc
    recorded = {m["name"]: m["heldout_accuracy"] for m in json.loads((world / "world.json").read_text())["models"]}
    for m in MODELS:
        for d in DOMAINS:
            # the build answered in a one-thread worker, this test in this process: float sums may
            # round differently and flip a near-tie, so allow two turns of slack
            assert abs(recorded[m][d] - acc[m][d]) <= 2 / table[m][d]["total"] + 1e-9, (m, d, recorded[m], acc[m])
