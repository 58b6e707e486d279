"""Training rows from teacher records: positions, labels, MinCE targets, one teacher, missing source."""

from __future__ import annotations

import numpy as np
import pytest

from core.chat import render_chat, tokenize_chat
from core.errors import PivotfuseError
from fuse.targets.fusion import translate_topk
from fuse.targets.pairing import pair_positions, reply_keys
from fuse.extract.store import TeacherRecord
from fuse.targets.rows import FusionStats, fusion_rows

L3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
      "{% endfor %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
CONVS = [[{"role": "user", "content": "What is 6 x 3?"}, {"role": "assistant", "content": "6 x 3 equals 18."}],
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, naïve world!"},
          {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure: 1, 2, 3."}]]
K = 4


def tok(tokenizer_dirs, name, eos=None):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tokenizer_dirs[name]))
    if eos:
        t.eos_token = eos
    return t


def record(t, template, index, msgs, ce, seed) -> TeacherRecord:
    """A record as extraction writes it, with random top-k that always holds the gold token first."""
    r = render_chat(t, msgs, template)
    tc = tokenize_chat(t, r)
    pos = np.array([i for i, a in enumerate(tc.assistant) if a and i >= 1])
    gold = np.asarray(tc.input_ids)[pos]
    rng = np.random.default_rng(seed)
    topk = np.concatenate([gold[:, None], rng.integers(100, 5000, (len(pos), K - 1))], axis=1).astype(np.int32)
    lp = np.log(np.sort(rng.dirichlet(np.ones(K), len(pos)), axis=1)[:, ::-1]).astype(np.float16)
    return TeacherRecord(index=index, id=f"c{index}", domain="d", text=r.text,
                         assistant_spans=np.asarray(r.assistant_spans, np.int32), token_ids=gold.astype(np.int32),
                         spans=np.asarray([tc.offsets[i] for i in pos], np.int32), topk_ids=topk, topk_logprobs=lp,
                         gold_logprobs=lp[:, 0].copy(), ce=ce, n_chars=40, n_bytes=40, seq_len=len(tc.input_ids),
                         truncated=False)


@pytest.fixture(scope="module")
def setup(tokenizer_dirs):
    pt, st = tok(tokenizer_dirs, "llama3", "<|eot_id|>"), tok(tokenizer_dirs, "llama2")
    piv = [record(pt, L3, i, m, ce=1.0, seed=i) for i, m in enumerate(CONVS)]
    # conversation 0: the source is better (wins MinCE); conversation 1: worse
    src = [record(st, INST, i, m, ce=ce, seed=10 + i) for i, (m, ce) in enumerate(zip(CONVS, (0.2, 3.0)))]
    vmap = np.full(len(st), -1, dtype=np.int64)
    vmap[np.arange(len(st))] = np.arange(len(st)) % 900 + 7  # an arbitrary total map, with collisions
    vmap[5] = -1
    return pt, piv, src, vmap


def test_rows_hold_the_pivot_sequence_labels_and_mince_targets(setup):
    pt, piv, src, vmap = setup
    stats = FusionStats()
    rows = list(fusion_rows(piv, lambda i: src[i], pt, vmap, "mince", K, "pivot", ("<|eot_id|>", "</s>"), stats))
    paired = 0
    for rec, s_rec, row in zip(piv, src, rows):
        ids = pt(rec.text, add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == ids
        labelled = [t for t, y in enumerate(row["labels"]) if y != -100]
        assert [row["labels"][t] for t in labelled] == rec.token_ids.tolist()
        assert len(row["target_ids"]) == len(labelled) == rec.n_tokens
        pair = pair_positions(reply_keys(rec.text, rec.spans, rec.assistant_spans, "<|eot_id|>"),
                              reply_keys(s_rec.text, s_rec.spans, s_rec.assistant_spans, "</s>"))
        paired += int((pair >= 0).sum())
        if s_rec.ce * s_rec.n_tokens < rec.ce * rec.n_tokens:  # the source wins this conversation
            for j, i in enumerate(pair.tolist()):
                want = translate_topk(s_rec.topk_ids[[i]], s_rec.topk_logprobs[[i]].astype(np.float32), vmap)[0] \
                    if i >= 0 else rec.topk_ids[[j]]
                assert row["target_ids"][j].tolist() == want[0].tolist()
        else:
            assert np.array_equal(row["target_ids"], rec.topk_ids)
            assert np.allclose(row["target_logprobs"].astype(np.float32), rec.topk_logprobs.astype(np.float32))
    assert stats.winners == {"source": 1, "pivot": 1}
    assert stats.positions == sum(r.n_tokens for r in piv) and stats.paired == paired > 0
    assert stats.from_source == stats.as_dict()["from_source"] > 0


def test_one_teacher_and_missing_source(setup):
    pt, piv, src, vmap = setup
    stats = FusionStats()
    rows = list(fusion_rows(piv, None, pt, None, "mince", K, "pivot", ("<|eot_id|>", None), stats))
    assert all(np.array_equal(r["target_ids"], p.topk_ids) for r, p in zip(rows, piv))
    stats = FusionStats()
    rows = list(fusion_rows(piv, lambda i: None, pt, vmap, "avgce", K, "pivot", ("<|eot_id|>", "</s>"), stats))
    assert stats.source_missing == 2 and stats.paired == 0 and stats.from_source == 0
    assert all(np.array_equal(r["target_ids"], p.topk_ids) for r, p in zip(rows, piv))


def test_a_store_from_another_tokenizer_is_refused(setup, tokenizer_dirs):
    _, piv, _, _ = setup
    other = tok(tokenizer_dirs, "qwen3")
    with pytest.raises(PivotfuseError, match="does not reproduce"):
        list(fusion_rows(piv, None, other, None, "mince", K, "pivot", ("<|eot_id|>", None), FusionStats()))
