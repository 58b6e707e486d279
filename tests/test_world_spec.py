"""The world spec (`world.spec`): the real-shapes spec loads and gives the recipe its models; each
mistake is one line naming the file and the field, and `cli.py run` exits 2 with it."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asset_paths import need_asset
from core.errors import PivotfuseError

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "recipes" / "worlds" / "real-shapes.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    for name in ("llama2", "llama3", "qwen3", "gemma3", "deepseek_v3"):
        need_asset(name)
    return yaml.safe_load(SPEC.read_text())


def _load(tmp_path: Path, data: dict):
    from world.spec import load_spec

    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data))
    return p, lambda: load_spec(p)


def test_real_shapes_spec_and_recipe_models(raw, monkeypatch):
    from pipeline.recipe import load_recipe
    from world.spec import load_spec

    spec = load_spec(SPEC)
    assert [(m.name, m.config, m.domain) for m in spec.models] == [
        ("pivot", "MistralConfig", None), ("mixtral", "MixtralConfig", "arith"), ("qwen3", "Qwen3Config", "strings"),
        ("gemma3", "Gemma3TextConfig", "facts"), ("llama3", "LlamaConfig", "chat"),
        ("deepseek", "DeepseekV3Config", "arith")]
    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes" / "real-shapes.yaml")
    assert recipe.models.pivot.path == "world:pivot"
    assert [(s.name, s.path, s.domain) for s in recipe.models.sources] == [
        (m.name, f"world:{m.name}", m.domain) for m in spec.sources]
    assert recipe.world_path("world:gemma3") == ".cache/real-shapes-world/models/gemma3"
    assert recipe.world_path("world:heldout") == ".cache/real-shapes-world/data/heldout.jsonl"


def _set(data: dict, path: str, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


CASES = [
    ("sources.0.config", "MixtureConfig", r"'sources\[0\].config': 'MixtureConfig' is not a transformers config class"),
    ("sources.0.config", "CLIPVisionConfig", r"'sources\[0\].config': CLIPVisionConfig has no causal-LM model"),
    ("sources.0.settings.expert_count", 4, r"'sources\[0\].settings.expert_count': MixtralConfig has no setting"),
    ("pivot.settings.vocab_size", 1000, r"'pivot.settings.vocab_size': set from the tokenizer, not by hand"),
    ("sources.1.tokenizer.folder", "no/such/folder", r"'sources\[1\].tokenizer.folder': no/such/folder has no "
                                                     r"tokenizer.json"),
    ("sources.1.tokenizer.folder", "assets:mistral", r"'sources\[1\].tokenizer.folder': unknown tokenizer asset"),
    ("sources.0.chat_template", "tokenizer", r"'sources\[0\].chat_template': .*llama2 has no chat template of its "
                                             r"own; name a jinja file"),
    ("sources.2.chat_template", "nope.jinja", r"'sources\[2\].chat_template': file 'nope.jinja' not found"),
    ("sources.3.domain", KeyError, r"'sources\[3\].domain': a source needs the domain it is the expert of"),
    ("sources.3.domain", "poetry", r"'sources\[3\].domain': 'poetry' is not one of arith, facts, strings, chat"),
    ("pivot.domain", "chat", r"'pivot.domain': the pivot is a generalist"),
    ("sources.2.name", "mixtral", r"'sources\[2\].name': 'mixtral' is used twice"),
    ("sources.2.settings", [1], r"'sources\[2\].settings' expects a mapping"),
    ("train.steps", 0, r"'train.steps'?:? must be > 0"),
    ("corpus.system_share", 1.5, r"system_share.*must be in \[0, 1\]"),
    ("sources", [], r"'sources': a world needs at least one source"),
]


@pytest.mark.parametrize("path,value,message", CASES, ids=[c[0] + "=" + str(c[1]) for c in CASES])
def test_bad_spec_one_line_naming_the_field(raw, tmp_path, monkeypatch, path, value, message):
    monkeypatch.chdir(REPO)  # the spec's template files are relative to the repository
    p, load = _load(tmp_path, _set(raw, path, value))
    with pytest.raises(PivotfuseError, match=message) as e:
        load()
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_cli_run_exits_2_on_a_bad_spec(raw, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_set(raw, "sources.0.settings.expert_count", 4)))
    recipe = yaml.safe_load((REPO / "recipes" / "real-shapes.yaml").read_text())
    recipe["world_spec"] = {"spec": str(spec), "out": str(tmp_path / "world")}
    recipe["out"] = str(tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "run", str(tmp_path / "r.yaml")], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"pivotfuse run: error: {spec}: 'sources[0].settings.expert_count': "
                                                 "MixtralConfig has no setting 'expert_count'")
    assert not (tmp_path / "world").exists() and not (tmp_path / "run").exists()


def test_one_world_per_recipe(tmp_path, monkeypatch):
    from pipeline.recipe import load_recipe

    monkeypatch.chdir(REPO)
    recipe = yaml.safe_load((REPO / "recipes" / "real-shapes.yaml").read_text())
    recipe["world"] = {"out": str(tmp_path / "w")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    need_asset("llama2")
    with pytest.raises(PivotfuseError, match="r.yaml: 'world_spec': a recipe has one world"):
        load_recipe(tmp_path / "r.yaml", check_paths=False)
