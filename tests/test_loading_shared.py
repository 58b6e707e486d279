"""`core.loading.load_tokenizer(shared=True)`: one object per folder, options and file state."""

from __future__ import annotations

import json
import os

from implicit_helpers import tiny_tokenizer

from core.loading import load_tokenizer


def test_shared_tokenizer_is_loaded_once_and_again_after_a_change(tmp_path) -> None:
    tiny_tokenizer().save_pretrained(tmp_path)
    a = load_tokenizer(tmp_path, shared=True)
    assert load_tokenizer(tmp_path, shared=True) is a
    assert load_tokenizer(tmp_path) is not a  # not shared unless asked: a caller may change its own
    assert load_tokenizer(tmp_path, shared=True, model_max_length=64) is not a  # other options, other object
    cfg = tmp_path / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data["model_max_length"] = 77
    cfg.write_text(json.dumps(data))
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime even on a coarse clock
    b = load_tokenizer(tmp_path, shared=True)
    assert b is not a and b.model_max_length == 77 and a.model_max_length != 77
