"""Recipe and config validation: every bad recipe gives one line naming the key and the file."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.config import add_arguments, apply_overrides, field, from_args, from_dict, load_config
from core.errors import PivotfuseError
from pipeline.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    k: int = field(10, help="k")


@dataclass
class Cfg:
    name: str = field(help="required name")
    lr: float = field(1e-3, help="learning rate")
    mode: str = field("mince", help="mode", choices=("mince", "avgce"))
    inner: Inner = field(default_factory=Inner, help="nested")
    tags: list[str] = field(default_factory=list, help="tags")
    flag: bool = field(False, help="flag")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr: must be > 0")


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_valid_config_and_defaults(tmp_path):
    cfg = load_config(Cfg, _yaml(tmp_path, "name: x\nlr: 1\ninner: {k: 3}\ntags: [a, b]\n"))
    assert (cfg.name, cfg.lr, cfg.inner.k, cfg.tags, cfg.mode) == ("x", 1.0, 3, ["a", "b"], "mince")
    assert isinstance(cfg.lr, float)


@pytest.mark.parametrize("text, needle", [
    ("name: x\nbogus: 1\n", "unknown key 'bogus'"),
    ("name: x\ninner: {kk: 1}\n", "unknown key 'inner.kk'"),
    ("name: x\nlr: fast\n", "'lr' expects a number"),
    ("name: x\ninner: {k: 1.5}\n", "'inner.k' expects an integer"),
    ("name: x\nflag: 3\n", "'flag' expects true/false"),
    ("name: x\nmode: maxce\n", "'mode' must be one of"),
    ("name: x\nlr: -1\n", "'lr': must be > 0"),
    ("name: x\nlr: .nan\n", "'lr' expects a finite number, got nan"),
    ("name: x\nlr: -.inf\n", "'lr' expects a finite number, got -inf"),
    ("name: x\nlr: " + "9" * 400 + "\n", "'lr' expects a finite number"),
    ("lr: 1\n", "missing required key 'name'"),
    ("name: [1\n", "invalid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_bad_config_names_key_and_file(tmp_path, text, needle):
    p = _yaml(tmp_path, text)
    with pytest.raises(PivotfuseError) as e:
        load_config(Cfg, p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


@dataclass
class Floats:
    x: float = field(1.0, help="a float")
    xs: list[float] | None = field(None, help="a list of floats")
    by_name: dict[str, float] = field(default_factory=dict, help="floats by name")


def _message(fn) -> str:
    with pytest.raises(PivotfuseError) as e:
        fn()
    return str(e.value)


def test_non_finite_floats_are_refused_from_yaml_set_and_flags(tmp_path):
    """NaN passes every range check (`nan <= 0` is False): each float is checked where it is read."""
    for text, tail in [("xs: [1, .inf]\n", "'xs[1]' expects a finite number, got inf"),
                       ("by_name: {a: 1, b: .nan}\n", "'by_name.b' expects a finite number, got nan"),
                       ("x: -.inf\n", "'x' expects a finite number, got -inf")]:
        p = _yaml(tmp_path, text)
        assert _message(lambda: load_config(Floats, p)) == f"{p}: {tail}"
    assert _message(lambda: load_config(Floats, None, ["xs=[.nan, 2]"])) == \
        "--set: 'xs[0]' expects a finite number, got nan"
    parser = argparse.ArgumentParser()
    add_arguments(parser, Floats)
    for argv, tail in [(["--x", "nan"], "'x' expects a finite number, got nan"),
                       (["--xs", "1", "inf"], "'xs[1]' expects a finite number, got inf")]:
        assert _message(lambda: from_args(Floats, parser.parse_args(argv))) == f"command line: {tail}"
    ok = from_args(Floats, parser.parse_args(["--x", "-2.5", "--xs", "1e300", "0"]))
    assert (ok.x, ok.xs) == (-2.5, [1e300, 0.0])  # finite extremes stay accepted


@dataclass
class Pair:
    a: int = field(0, help="a")
    b: int = field(0, help="b")

    def validate(self) -> None:
        if self.a and self.b:
            raise ValueError("give a or b, not both")
        if self.a < 0:
            raise ValueError(f"a: must be >= 0, got {self.a}")


@dataclass
class Outer:
    pair: Pair = field(default_factory=Pair, help="nested")


def test_validation_messages_quote_the_whole_key():
    """`validate()` says `field: reason`; the message quotes the key whole, balanced."""
    cases = [(Pair, {"a": -1}, "cfg.yaml: 'a': must be >= 0, got -1"),
             (Outer, {"pair": {"a": -1}}, "cfg.yaml: 'pair.a': must be >= 0, got -1"),
             (Outer, {"pair": {"a": 1, "b": 1}}, "cfg.yaml: 'pair': give a or b, not both"),
             (Pair, {"a": 1, "b": 1}, "cfg.yaml: give a or b, not both")]
    for cls, data, message in cases:
        assert _message(lambda: from_dict(cls, data, src="cfg.yaml")) == message


def test_overrides():
    data = apply_overrides({"inner": {"k": 1}, "xs": [{"a": 1}]}, ["inner.k=5", "lr=0.5", "xs.0.a=2", "name=y"])
    assert data == {"inner": {"k": 5}, "lr": 0.5, "xs": [{"a": 2}], "name": "y"}
    cfg = from_dict(Cfg, {k: v for k, v in data.items() if k != "xs"})
    assert (cfg.inner.k, cfg.lr, cfg.name) == (5, 0.5, "y")
    with pytest.raises(PivotfuseError, match="expected key=value"):
        apply_overrides({}, ["oops"])
    with pytest.raises(PivotfuseError, match="no list item 3"):
        apply_overrides({"xs": []}, ["xs.3.a=1"])


def test_missing_file():
    with pytest.raises(PivotfuseError, match="nope.yaml: file not found"):
        load_config(Cfg, "nope.yaml")


def test_demo_recipe_loads():
    r = load_recipe(REPO / "recipes" / "demo.yaml")
    assert r.models.pivot.name == "pivot" and [s.name for s in r.models.sources] == ["arith", "facts", "strings"]
    assert r.world_path("world:fusion").endswith("data/fusion.jsonl")
    assert r.world_path("world:arith").endswith("models/arith")
    assert r.world_path("world:valid").endswith("data/valid.jsonl")  # settings are chosen on it, never scored
    assert r.world_path("world:heldout_questions").endswith("data/heldout_questions.jsonl")


def test_recipe_errors(tmp_path):
    base = (REPO / "recipes" / "demo.yaml").read_text()
    p = _yaml(tmp_path, base.replace('path: "world:arith"', 'path: "/no/such/model"'))
    with pytest.raises(PivotfuseError, match=r"arith: path '/no/such/model' is not a folder"):
        load_recipe(p)
    p = _yaml(tmp_path, base.replace("seed: 0", "seed: zero"))
    with pytest.raises(PivotfuseError, match=r"'world.seed' expects an integer"):
        load_recipe(p)
    p = _yaml(tmp_path, base.replace('{name: facts', '{name: arith'))
    with pytest.raises(PivotfuseError, match="duplicate model name 'arith'"):
        load_recipe(p)
    with pytest.raises(PivotfuseError, match="'merge': name 'ties' is used twice"):
        load_recipe(REPO / "recipes" / "demo.yaml", ["merge.5.name=ties"])
    with pytest.raises(PivotfuseError, match="'world.train_steps': must be > 0"):
        load_recipe(REPO / "recipes" / "demo.yaml", ["world.train_steps=0"])


def test_cli_one_line_error(tmp_path):
    p = _yaml(tmp_path, "world:\n  seed: zero\n")
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "world", "--recipe", str(p)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "'seed' expects an integer" in r.stderr and str(p) in r.stderr


def test_cli_help_lists_commands():
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "world" in r.stdout


def test_assistant_span_ends_with_the_end_of_turn_token(tokenizer_dirs):
    """Llama-3 closes a turn with <|eot_id|>, not its EOS <|end_of_text|>: the span must hold it."""
    from transformers import AutoTokenizer

    from core.chat import render_chat, tokenize_chat

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    want = {"llama3": "<|eot_id|>", "qwen3": "<|im_end|>", "gemma3": "<end_of_turn>"}
    for name, ender in want.items():
        tok = AutoTokenizer.from_pretrained(tokenizer_dirs[name])
        r = render_chat(tok, msgs)
        assert [r.text[s:e] for s, e in r.assistant_spans] == [f"Hello there.{ender}", f"See you.{ender}"], name
        t = tokenize_chat(tok, r)
        marked = [tok.convert_ids_to_tokens(i) for i, a in zip(t.input_ids, t.assistant) if a]
        assert marked.count(ender) == 2 and "user" not in "".join(marked), (name, marked)
