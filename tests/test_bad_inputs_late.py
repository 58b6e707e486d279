"""A file given where a model folder is expected: every command says it is a file (one line, exit 2),
not that a folder is missing; and each stops before reading any weights or writing any output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "model"  # stands for a model folder: these runs stop before reading it
    folder.mkdir()
    file = tmp_path / "model.json"
    file.write_text("{}")
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    return {"root": tmp_path, "folder": folder, "file": file, "data": data, "out": tmp_path / "out"}


def _one_line_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err.strip()


def test_fuse_pivot_and_source(paths: dict, capsys: pytest.CaptureFixture) -> None:
    f, d, file, out = str(paths["folder"]), str(paths["data"]), paths["file"], str(paths["out"])
    assert _one_line_error(capsys, "fuse", "--pivot", str(file), "--source", f, "--data", d, "--out", out) == (
        f"pivotfuse fuse: error: command line: model pivot: {file} is a file, not a model folder")
    assert _one_line_error(capsys, "fuse", "--pivot", f, "--source", str(file), "--data", d, "--out", out) == (
        f"pivotfuse fuse: error: command line: model model.json: {file} is a file, not a model folder")
    recipe = paths["root"] / "r.yaml"
    recipe.write_text(f"out: {out}\nmodels:\n  pivot: {{name: p, path: {f}}}\n  sources:\n"
                      f"    - {{name: s, path: {f}}}\ndata: {{fusion: {d}}}\n")
    assert _one_line_error(capsys, "fuse", "--recipe", str(recipe), "--source", "s", "--pivot", str(file)) == (
        f"pivotfuse fuse: error: {recipe}: model p: {file} is a file, not a model folder")
    assert not paths["out"].exists()


def test_run_recipe_model_path(paths: dict, capsys: pytest.CaptureFixture) -> None:
    recipe = paths["root"] / "r.yaml"
    recipe.write_text(f"out: {paths['out']}\nmodels:\n  pivot: {{name: p, path: {paths['folder']}}}\n  sources:\n"
                      f"    - {{name: s, path: {paths['file']}}}\ndata: {{fusion: {paths['data']}}}\n")
    assert _one_line_error(capsys, "run", str(recipe)) == (
        f"pivotfuse run: error: {recipe}: 'models' s: path '{paths['file']}' is a file, not a model folder")
    assert not paths["out"].exists()


def test_merge_base_and_models(paths: dict, capsys: pytest.CaptureFixture) -> None:
    f, file, out = str(paths["folder"]), paths["file"], str(paths["out"])
    for flag, args in (("base", ["--base", str(file), "--models", f]), ("models", ["--base", f, "--models", f, str(file)])):
        assert _one_line_error(capsys, "merge", *args, "--method", "linear", "--out", out) == (
            f"pivotfuse merge: error: {flag}: {file} is a file, not a model folder")
    assert not paths["out"].exists()


@pytest.mark.parametrize("spec", ["{file}", "x={file}"])
def test_eval_model(paths: dict, capsys: pytest.CaptureFixture, spec: str) -> None:
    file, model = paths["file"], spec.format(file=paths["file"])
    message = f"pivotfuse eval: error: model: {file} is a file, not a model folder"
    assert _one_line_error(capsys, "eval", "loss", "--model", model, "--data", str(paths["data"]),
                           "--out", str(paths["out"])) == message
    assert _one_line_error(capsys, "eval", "mtbench", "--model", model, "--judge", "reference", "--questions", "demo",
                           "--out", str(paths["out"])) == message
