"""The demo world: deterministic, loadable offline, heterogeneous, with the expertise structure fusion needs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.chat import load_conversations, render_chat
from core.errors import PivotfuseError
from world.build import build_world
from world.config import WorldConfig
from world.corpus import DOMAINS, SKILLS, check_answer, make_corpus
from world.train import loss_per_char

MODELS = ("pivot", "arith", "facts", "strings")
TINY = dict(n_source_train=12, n_general=12, n_fusion=4, n_heldout=4, train_steps=2, batch_size=4)


def test_corpus_deterministic_checkable_and_split():
    a, b = make_corpus(3, 30, 30, 10, 10), make_corpus(3, 30, 30, 10, 10)
    assert [c.messages for c in a["fusion"]] == [c.messages for c in b["fusion"]]
    assert [c.messages for c in make_corpus(4, 30, 30, 10, 10)["fusion"]] != [c.messages for c in a["fusion"]]
    assert {c.domain for c in a["source_train"]} == set(SKILLS)
    assert {c.domain for c in a["heldout"]} == set(DOMAINS) == {c.domain for c in a["fusion"]}
    assert {c.domain for c in a["general"]} == {"chat"}
    assert all(check_answer(c, 3) for split in a.values() for c in split)
    assert any(len(c.messages) == 4 for c in a["fusion"])  # multi-turn present
    # the checker is not vacuous: a wrong sum is caught
    bad = next(c for c in a["source_train"] if c.domain == "arith")
    bad.messages[1]["content"] = "It is 100000."
    assert not check_answer(bad, 3)


def _digest(out) -> tuple:
    meta = json.loads((out / "world.json").read_text())
    data = tuple((out / "data" / f"{s}.jsonl").read_bytes() for s in ("source_train", "general", "fusion", "heldout"))
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
    may pick a tokenizer class by model type); arith carries the real Llama-2 tokenizer."""
    text = "Hello world!\n  Reverse 'apple': elppa. 12 x 7 = 84\tdone"
    real = AutoTokenizer.from_pretrained(tokenizer_dirs["llama2"])
    arith = AutoTokenizer.from_pretrained(world / "models" / "arith")
    assert arith(text)["input_ids"] == real(text)["input_ids"]
    for name in ("pivot", "facts", "strings"):
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
