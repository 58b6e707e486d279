"""Vocabulary map (fuse.align.vocab) and coverage (fuse.align.coverage): hand-computed small vocabularies,
identity maps of real tokenizers, special tokens, JSON round trip and bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from core.errors import PivotfuseError
from fuse.align.mined import Alignment
from fuse.align.coverage import Coverage
from fuse.align.surface import TokenText
from fuse.align.vocab import VocabMap, VocabMapBuilder, template_markers

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INST = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")

# A byte-level BPE pivot (Ġ = space, Ċ = newline) and a SentencePiece-style source (▁ = space,
# byte fallback), small enough to compute the exact matches by hand.
PIVOT_VOCAB = {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "Ġa": 5, "Ġab": 6, "Ċ": 7, "[": 8, "]": 9, "I": 10,
               "N": 11, "S": 12, "T": 13, "/": 14, "m": 15, "<|im_start|>": 16, "<|im_end|>": 17}
PIVOT_MERGES = [("a", "b"), ("Ġ", "a"), ("Ġa", "b")]
SOURCE_VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0x61>": 4, "▁": 5, "a": 6, "b": 7, "▁a": 8,
                "ab": 9, "▁ab": 10, "▁b": 11, "c": 12}
SOURCE_MERGES = [("▁", "a"), ("a", "b"), ("▁a", "b"), ("▁", "b")]
# by hand: <0x0A>=\n, <0x61>=a, ▁=' ', a, b, ▁a=' a', ab, ▁ab=' ab', c have a pivot twin; ▁b (' b')
# has none; <unk>, <s>, </s> are special. Exact share = 9 / 13.
EXACT_BY_HAND = {3: 7, 4: 0, 5: 3, 6: 0, 7: 1, 8: 5, 9: 4, 10: 6, 12: 2}


def pivot_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(PIVOT_VOCAB, PIVOT_MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    out.chat_template = CHATML
    return out


def source_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(SOURCE_VOCAB, SOURCE_MERGES, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out.chat_template = INST
    return out


def test_exact_share_small_vocabulary_by_hand():
    vmap = VocabMapBuilder(TokenText(pivot_tokenizer()), TokenText(source_tokenizer())).build()
    exact = {i: int(p) for i, (p, h) in enumerate(zip(vmap.mapping, vmap.how)) if h == "x"}
    assert exact == EXACT_BY_HAND
    assert vmap.stats["exact"] == 9 and vmap.stats["exact_share"] == pytest.approx(9 / 13)
    assert vmap.how[11] == "-" and vmap.to_pivot(11) == -1  # ▁b: no twin, never aligned
    # specials: the source's end of turn (</s>, also its EOS) → the pivot's <|im_end|>; <s>, <unk>: nothing
    assert vmap.to_pivot(2) == 17 and vmap.how[2] == "p"
    assert vmap.to_pivot(1) == -1 and vmap.to_pivot(0) == -1
    assert vmap.translate([6, 11, 2, 99, -5]).tolist() == [0, -1, 17, -1, -1]


def test_template_markers():
    assert template_markers(pivot_tokenizer())["turn_end"] == 17
    assert template_markers(pivot_tokenizer())["turn_start"] == 16
    src = template_markers(source_tokenizer())
    assert src["turn_end"] == 2 and src["eos"] == 2 and src["bos"] == 1


def _pairs(p_ids: list[int], s_ids: list[int]) -> tuple[Alignment, list[int], list[int]]:
    """A conversation whose tokens are aligned 1:1 in order."""
    k = len(p_ids)
    pairs = np.stack([np.arange(k), np.arange(k)], axis=1)
    return Alignment(k, k, pairs, 0, np.zeros(k, dtype=bool)), p_ids, s_ids


def test_statistical_entries_count_then_edit_distance_then_id():
    b = VocabMapBuilder(TokenText(pivot_tokenizer()), TokenText(source_tokenizer()))
    # ▁b (11) aligned 1:1 three times with 'c' (2) and three times with 'Ġab' (6), once with 'ab' (4):
    # the counts tie, ' b' is closer to ' ab' (1 edit) than to 'c' (2 edits) → 6, not the lower id 2
    b.add(*_pairs([2, 2, 2, 6, 6, 6, 4], [11] * 7))
    b.add(*_pairs([17], [11]))  # a special pivot token is never a statistical target
    vmap = b.build()
    assert vmap.to_pivot(11) == 6 and vmap.how[11] == "s" and [11, 6, 3] in vmap.evidence
    assert vmap.stats["aligned_pairs"] == 8 and vmap.stats["conversations"] == 2
    # exact matches win over statistics
    b.add(*_pairs([1] * 5, [6] * 5))
    assert b.build().to_pivot(6) == 0


def test_identity_maps(tokenizer_dirs):
    """A tokenizer onto itself: every id maps to itself, except second spellings of the same bytes
    (Llama-2's byte fallback <0x41> is 'A'), which map to the first spelling."""
    from transformers import AutoTokenizer

    for tok in (pivot_tokenizer(), AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama2"]))):
        tt = TokenText(tok)
        vmap = VocabMapBuilder(tt, tt).build()
        ids = np.arange(tt.vocab_size)
        same = vmap.mapping == ids
        vocab = tt.vocabulary()
        for i in np.flatnonzero(~same).tolist():
            assert tt.is_byte_fallback(i) and vmap.mapping[i] >= 0, i
            assert vocab[vmap.mapping[i]] == vocab[i]
        assert same.mean() > 0.99 and vmap.stats["unmapped"] == 0


def test_json_round_trip_and_bad_files(tmp_path):
    b = VocabMapBuilder(TokenText(pivot_tokenizer()), TokenText(source_tokenizer()))
    b.add(*_pairs([6], [11]))
    vmap = b.build()
    path = tmp_path / "map.json"
    vmap.save(path)
    back = VocabMap.load(path)
    assert back.mapping.tolist() == vmap.mapping.tolist() and back.how == vmap.how and back.stats == vmap.stats
    assert not (tmp_path / "map.json.tmp").exists()
    data = json.loads(path.read_text())
    bad = {"format": ("other", "'format'"), "how": ("x", "'how'"), "map": ([0, 1.5], "'map'")}
    for key, (value, msg) in bad.items():
        (tmp_path / "bad.json").write_text(json.dumps({**data, key: value}))
        with pytest.raises(PivotfuseError, match=msg):
            VocabMap.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({**data, "map": [99] * len(data["map"])}))
    with pytest.raises(PivotfuseError, match="outside the pivot vocabulary"):
        VocabMap.load(tmp_path / "bad.json")
    with pytest.raises(PivotfuseError, match="not found"):
        VocabMap.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PivotfuseError, match=r"bad.json:1: invalid JSON \(Expecting property name"):
        VocabMap.load(tmp_path / "bad.json")


def test_coverage_by_hand():
    """Pivot tokens 0..5 against source tokens 0..5:
    0-0 exact 1:1 · 1-1 1:1, mapped · 2-2 1:1, the map says otherwise · 3-(3,4) one to many ·
    4,5-5 many to one · and pivot 6 unaligned."""
    groups = np.array([[0, 0], [1, 1], [2, 2], [3, 3], [3, 4], [4, 5], [5, 5]])
    exact = np.array([True, False, False, False, False, False, False])
    al = Alignment(7, 6, groups, 0, exact)
    cov = Coverage()
    cov.add(al, pivot_ids=[10, 11, 12, 13, 14, 15, 16], source_ids=[20, 21, 22, 23, 24, 25])
    mapping = np.full(30, -1)
    mapping[21], mapping[22] = 11, 99
    rep = cov.report(mapping)
    assert rep["positions"] == 7 and rep["exact"] == 1 and rep["mapped"] == 1 and rep["mismatch"] == 1
    assert rep["one_to_many"] == 1 and rep["many_to_one"] == 2 and rep["unaligned"] == 1
    assert rep["none"] == 5 and rep["exact_share"] + rep["mapped_share"] + rep["none_share"] == pytest.approx(1)
    assert Coverage.from_state(json.loads(json.dumps(cov.state()))).report(mapping) == rep
