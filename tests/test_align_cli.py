"""`python cli.py align`: end to end on real tokenizers, reuse, resume after an interruption, bad
inputs; the demo world's tokenizers (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cli
from fuse.align.vocab import VocabMap

CHATS = [
    {"id": "1", "messages": [{"role": "user", "content": "What is 1234 + 5678?"},
                             {"role": "assistant", "content": "1234 + 5678 = 6912. Café ☕, naïve 😀."}]},
    {"id": "2", "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Write a loop."},
                             {"role": "assistant", "content": "for i in range(10):\n    print(i ** 2)\n"},
                             {"role": "user", "content": "日本語で?"},
                             {"role": "assistant", "content": "はい、日本語です。"}]},
    {"id": "3", "messages": [{"role": "user", "content": "List three colours."},
                             {"role": "assistant", "content": "1. red\n2. green\n3. blue"}]},
]


def write_chats(path: Path, n: int = 12) -> Path:
    with path.open("w") as fh:
        for k in range(n):
            row = dict(CHATS[k % len(CHATS)], id=str(k))
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def run_align(*args: str) -> int:
    return cli.main(["align", *args])


@pytest.fixture
def llama2_pair(tokenizer_dirs, tmp_path) -> list[str]:
    """Llama-2 (32k, quick to load) against itself under two chat templates: ChatML and [INST]."""
    from test_align_vocab import CHATML, INST

    (tmp_path / "chatml.jinja").write_text(CHATML)
    (tmp_path / "inst.jinja").write_text(INST)
    llama2 = str(tokenizer_dirs["llama2"])
    return ["--pivot", llama2, "--source", llama2, "--pivot-chat-template", str(tmp_path / "chatml.jinja"),
            "--source-chat-template", str(tmp_path / "inst.jinja")]


def test_align_cli_real_tokenizers(tokenizer_dirs, tmp_path, capsys):
    data = write_chats(tmp_path / "chats.jsonl")
    out = tmp_path / "qwen3_on_llama3.json"
    rc = run_align("--pivot", str(tokenizer_dirs["llama3"]), "--source", str(tokenizer_dirs["qwen3"]),
                   "--data", str(data), "--out", str(out))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "coverage of" in printed and "exact" in printed
    vmap = VocabMap.load(out)
    from align_helpers import token_texts

    p = token_texts(str(tokenizer_dirs["llama3"])).tokenizer
    s = token_texts(str(tokenizer_dirs["qwen3"])).tokenizer
    # both byte-level with the same text spellings for most tokens; specials mapped by their role
    assert vmap.stats["exact"] > 100_000
    assert vmap.to_pivot(s.convert_tokens_to_ids("<|im_end|>")) == p.convert_tokens_to_ids("<|eot_id|>")
    assert vmap.to_pivot(s.convert_tokens_to_ids("Hello")) == p.convert_tokens_to_ids("Hello")
    cov = vmap.stats["coverage"]
    assert cov["exact"] + cov["mapped"] + cov["none"] == cov["positions"] > 0
    assert cov["exact_share"] > 0.6  # alike but for digit groups (Llama-3: 3 digits a token, Qwen3: 1)
    assert cov["mapped"] >= 16  # at least every end-of-turn token (<|im_end|> → <|eot_id|>)
    assert vmap.stats["conversations"] == 12 and vmap.stats["skipped_conversations"] == 0
    # a second run with the same inputs reuses the map
    mtime = out.stat().st_mtime_ns
    assert run_align("--pivot", str(tokenizer_dirs["llama3"]), "--source", str(tokenizer_dirs["qwen3"]),
                     "--data", str(data), "--out", str(out)) == 0
    assert out.stat().st_mtime_ns == mtime


def test_align_cli_resumes_after_interruption(llama2_pair, tmp_path, monkeypatch):
    data = write_chats(tmp_path / "chats.jsonl", n=9)
    # one process: the interruption counts calls, and each worker process would count its own
    args = [*llama2_pair, "--data", str(data), "--checkpoint-every", "2", "--workers", "1"]
    assert run_align(*args, "--out", str(tmp_path / "fresh.json")) == 0
    import fuse.align.chat as chat_align

    real = chat_align.align_chat
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(chat_align, "align_chat", flaky)
    out = tmp_path / "resumed.json"
    assert run_align(*args, "--out", str(out)) == 130  # interrupted after 5 conversations
    partial = json.loads((tmp_path / "resumed.json.partial").read_text())
    assert partial["done"] == 4 and not out.exists()
    monkeypatch.setattr(chat_align, "align_chat", real)
    calls["n"] = 0
    assert run_align(*args, "--out", str(out)) == 0
    fresh, resumed = VocabMap.load(tmp_path / "fresh.json"), VocabMap.load(out)
    assert resumed.mapping.tolist() == fresh.mapping.tolist()
    assert resumed.stats == fresh.stats and not (tmp_path / "resumed.json.partial").exists()


def test_align_cli_bad_inputs(tokenizer_dirs, tmp_path, capsys):
    data = write_chats(tmp_path / "chats.jsonl", n=2)
    llama3 = str(tokenizer_dirs["llama2"])  # any tokenizer folder: these runs stop before aligning
    cases = [
        (["--pivot", str(tmp_path / "nope"), "--source", llama3, "--data", str(data)], "nope: model folder not found"),
        (["--pivot", llama3, "--source", llama3, "--data", str(tmp_path / "none.jsonl")], "data file not found"),
        (["--pivot", llama3, "--source", llama3, "--data", str(data), "--halo", "-1"], "'halo': must be >= 0"),
        (["--pivot", llama3, "--source", llama3, "--data", str(data), "--source-chat-template", "x.jinja"],
         "x.jinja: chat template file not found"),
    ]
    for args, message in cases:
        assert run_align(*args, "--out", str(tmp_path / "m.json")) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    assert run_align("--pivot", llama3, "--source", llama3, "--data", str(tmp_path / "bad.jsonl"),
                     "--out", str(tmp_path / "m.json")) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    no_template = tmp_path / "no_template"
    shutil.copytree(tokenizer_dirs["llama2"], no_template)  # Llama-2 ships no chat template
    assert run_align("--pivot", str(tokenizer_dirs["llama3"]), "--source", str(no_template), "--data", str(data),
                     "--out", str(tmp_path / "m.json")) == 2
    assert "no conversation renders" in capsys.readouterr().err


@pytest.mark.slow
def test_world_tokenizers(world, tmp_path):
    """The demo world's pivot and its three sources: equal cost to the full DP on real replies,
    the identity map of the pivot onto itself, and the exact share the map reports."""
    from align_helpers import token_texts
    from core.chat import load_conversations, render_chat, tokenize_chat
    from fuse.align.mined import align_tokens
    from fuse.align.build import build_map
    from fuse.align.config import AlignConfig
    from fuse.align.chat import ChatTokens, content_end
    from fuse.align.vocab import VocabMapBuilder
    from test_align import naive_cost

    models = world / "models"
    convs = load_conversations(world / "data" / "fusion.jsonl", limit=6)
    pivot = token_texts(str(models / "pivot"))
    ident = VocabMapBuilder(pivot, pivot).build()
    assert (ident.mapping == np.arange(pivot.vocab_size)).mean() > 0.99
    for name in ("arith", "facts", "strings"):
        source = token_texts(str(models / name))
        for conv in convs:
            views = []
            for tt in (pivot, source):
                r = render_chat(tt.tokenizer, conv.messages)
                views.append(ChatTokens.from_tokenized(r, tokenize_chat(tt.tokenizer, r)))
            for (ps, pe), (ss, se) in zip(views[0].assistant_spans, views[1].assistant_spans):
                texts = []
                for view, tt, (s0, e0) in ((views[0], pivot, (ps, pe)), (views[1], source, (ss, se))):
                    end = content_end(view.text, s0, e0, tt.tokenizer.eos_token)
                    reply = view.text[s0:end]
                    enc = tt.tokenizer(reply, add_special_tokens=False, return_offsets_mapping=True)
                    texts.append((tt.in_context(enc["input_ids"], enc["offset_mapping"], reply), enc["offset_mapping"]))
                (a, a_off), (b, b_off) = texts
                assert align_tokens(a, b, a_off, b_off).cost == naive_cost(a, b)
        vmap = build_map(str(models / "pivot"), str(models / name), str(world / "data" / "fusion.jsonl"),
                         tmp_path / f"{name}.json", AlignConfig(limit=40), progress=False)
        s = vmap.stats
        assert s["exact"] + s["statistical"] + s["special"] + s["unmapped"] == s["source_vocab"]
        assert s["exact_share"] == pytest.approx(vmap.how.count("x") / len(vmap.how))
        cov = s["coverage"]
        assert cov["exact_share"] + cov["mapped_share"] + cov["none_share"] == pytest.approx(1)


def test_align_cli_bad_outputs_fail_before_the_work(llama2_pair, tmp_path, capsys, monkeypatch):
    import fuse.align.chat as chat_align

    def no_work(*a, **k):
        raise AssertionError("aligned before the output was checked")

    monkeypatch.setattr(chat_align, "align_chat", no_work)
    data = write_chats(tmp_path / "chats.jsonl", n=3)
    folder = tmp_path / "maps"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    model = tmp_path / "model"
    shutil.copytree(llama2_pair[1], model)
    pair = ["--pivot", str(model), "--source", str(model), *llama2_pair[4:]]
    cases = [(folder, f"out: {folder} is a folder, not a file for the map's JSON"),
             (data / "m.json", f"out: {data} is a file, so {data / 'm.json'} cannot be written"),
             (model / "m.json", f"out: {model / 'm.json'} is inside the input model folder {model}; "
                                "inputs are never modified"),
             (data, f"out: {data} exists and is not a vocabulary map; use another --out")]
    corpus = data.read_bytes()
    for out, message in cases:
        assert run_align(*pair, "--data", str(data), "--out", str(out)) == 2
        assert capsys.readouterr().err == f"pivotfuse align: error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["chats.jsonl", "chatml.jinja", "inst.jinja", "maps", "model"])
    assert [p.name for p in folder.iterdir()] == ["keep.txt"] and "m.json" not in {p.name for p in model.iterdir()}
    assert data.read_bytes() == corpus


def test_align_cli_file_given_as_a_model(tokenizer_dirs, tmp_path, capsys):
    data = write_chats(tmp_path / "chats.jsonl", n=2)
    llama2, file = str(tokenizer_dirs["llama2"]), tokenizer_dirs["llama2"] / "tokenizer.json"
    for flag, args in (("pivot", ["--pivot", str(file), "--source", llama2]),
                       ("source", ["--pivot", llama2, "--source", str(file)])):
        assert run_align(*args, "--data", str(data), "--out", str(tmp_path / "m.json")) == 2
        assert capsys.readouterr().err == f"pivotfuse align: error: {flag}: {file} is a file, not a model folder\n"


def test_align_cli_same_map_with_one_and_two_processes(llama2_pair, tmp_path):
    """Shards of 2 conversations (`--checkpoint-every 2`) over 1 and 2 processes: the same bytes; the
    fingerprint, hashed while the corpus streams by, is the one of the whole corpus list (maps made
    before the corpus was streamed are reused)."""
    from dataclasses import asdict
    from pathlib import Path as P

    from core.chat import load_conversations
    from core.fingerprint import digest, source_bytes, tokenizer_files
    from fuse.align.build import CODE
    from fuse.align.config import AlignConfig

    data = write_chats(tmp_path / "chats.jsonl", n=11)
    outs = []
    for workers in ("1", "2"):
        outs.append(tmp_path / f"map{workers}.json")
        assert run_align(*llama2_pair, "--data", str(data), "--checkpoint-every", "2", "--workers", workers,
                         "--out", str(outs[-1])) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    import fuse.align.build as build

    cfg = AlignConfig(checkpoint_every=2)
    whole = digest(source_bytes(P(build.__file__).parent, CODE), tokenizer_files(llama2_pair[1]),
                   tokenizer_files(llama2_pair[3]), (tmp_path / "chatml.jinja").read_text(),
                   (tmp_path / "inst.jinja").read_text(), [(c.id, c.messages) for c in load_conversations(data)],
                   {k: v for k, v in asdict(cfg).items() if k != "workers"} | {"checkpoint_every": None})
    vmap = VocabMap.load(outs[0])
    assert vmap.fingerprint == whole
    # the map of one builder fed conversation by conversation, as before the shards
    from core.chat import render_chat, tokenize_chat
    from core.loading import load_tokenizer
    from fuse.align.chat import ChatTokens, align_chat
    from fuse.align.coverage import Coverage
    from fuse.align.surface import TokenText
    from fuse.align.vocab import VocabMapBuilder, template_markers

    tok = load_tokenizer(llama2_pair[1])
    tpl = [(tmp_path / f).read_text() for f in ("chatml.jinja", "inst.jinja")]
    tt = TokenText(tok)
    ref, cov = VocabMapBuilder(tt, tt, *(template_markers(tok, t) for t in tpl)), Coverage()
    for conv in load_conversations(data):
        r = [render_chat(tok, conv.messages, t) for t in tpl]
        ids = [tokenize_chat(tok, x, cfg.max_length) for x in r]
        al = align_chat(*(ChatTokens.from_tokenized(x, i) for x, i in zip(r, ids)), tt, tt, halo=cfg.halo,
                        theta=cfg.theta)
        ref.add(al, ids[0].input_ids, ids[1].input_ids)
        cov.add(al, ids[0].input_ids, ids[1].input_ids)
    serial = ref.build()
    assert np.array_equal(vmap.mapping, serial.mapping) and vmap.stats["conversations"] == 11
    assert {k: v for k, v in vmap.stats.items() if k in serial.stats} == serial.stats
    assert vmap.stats["coverage"] == cov.report(serial.mapping)
