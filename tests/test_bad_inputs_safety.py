"""Bad inputs from the command line: the process stays offline whatever the environment says,
and each bad value is one line on stderr with exit code 2, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from test_merge_fixtures import build_family

REPO = Path(__file__).resolve().parents[1]
FORCED = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
          "HF_HUB_DISABLE_TELEMETRY": "1"}


def test_cli_forces_offline_over_the_users_environment(monkeypatch, tmp_path, capsys):
    """`HF_HUB_OFFLINE=0` in a shell used to survive (setdefault), letting TRL's trainer telemetry
    reach the Hub; the libraries read these flags at import, so theirs are forced as well."""
    import datasets.config
    import huggingface_hub.constants as hub
    from huggingface_hub.utils import _telemetry, send_telemetry

    for key in FORCED:
        monkeypatch.setenv(key, "0")
    # as if huggingface_hub and datasets had been imported under that environment
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_DISABLE_TELEMETRY", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    assert cli.main(["merge", "--config", str(tmp_path / "missing.yaml")]) == 2  # a cheap command
    assert "missing.yaml: file not found" in capsys.readouterr().err
    assert {k: os.environ[k] for k in FORCED} == FORCED
    assert hub.is_offline_mode() and hub.HF_HUB_DISABLE_TELEMETRY and datasets.config.HF_HUB_OFFLINE

    def no_network() -> None:
        raise AssertionError("telemetry thread started")

    monkeypatch.setattr(_telemetry, "_start_telemetry_thread", no_network)
    queued = _telemetry._TELEMETRY_QUEUE.qsize()
    send_telemetry("trl/SFTTrainer", library_name="trl", library_version="1.16")  # what SFTTrainer.__init__ sends
    assert _telemetry._TELEMETRY_QUEUE.qsize() == queued


def test_cli_process_is_offline_with_offline_0_exported(tmp_path):
    """The real case: a fresh `python cli.py ...` from a shell that exported HF_HUB_OFFLINE=0."""
    probe = (f"import cli; cli.main(['merge', '--config', {str(tmp_path / 'missing.yaml')!r}]); "
             "import os, huggingface_hub.constants as c; "
             f"print(c.is_offline_mode(), c.HF_HUB_DISABLE_TELEMETRY, [os.environ[k] for k in {sorted(FORCED)!r}])")
    env = {**os.environ, **{k: "0" for k in FORCED}, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.stdout.strip() == "True True ['1', '1', '1', '1']", r.stderr


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("fam"), k=2)


def _merge_cli(capsys, *argv: str) -> str:
    rc = cli.main(["merge", *argv, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("pivotfuse merge: error: ")
    return err.strip().removeprefix("pivotfuse merge: error: ")


@pytest.mark.parametrize("flags, message", [
    (["--scale", "nan"], "command line: 'scale' expects a finite number, got nan"),
    (["--scale=-inf"], "command line: 'scale' expects a finite number, got -inf"),
    (["--method", "ties", "--weights", "inf", "1"], "command line: 'weights[0]' expects a finite number, got inf"),
    (["--threads", "0"], "threads: must be at least 1, got 0"),
    (["--threads", "-3"], "threads: must be at least 1, got -3"),
    (["--density", "2"], "command line: 'density': must be in (0, 1], got 2.0"),
])
def test_bad_merge_flags_are_one_line_and_exit_2(family, tmp_path, capsys, flags, message):
    base, targets = family
    out = tmp_path / "out"
    assert _merge_cli(capsys, "--base", str(base), "--models", *map(str, targets), "--out", str(out),
                      *flags) == message
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_bad_merge_file_values_name_the_file(family, tmp_path, capsys):
    base, targets = family
    cfg = tmp_path / "merge.yaml"
    head = f"base: {base}\nmodels: [{targets[0]}, {targets[1]}]\nmethod: ties\nout: {tmp_path / 'out'}\n"
    cfg.write_text(head + "weights: [.inf, 1]\n")
    assert _merge_cli(capsys, "--config", str(cfg)) == f"{cfg}: 'weights[0]' expects a finite number, got inf"
    cfg.write_text(head + "scale: .nan\n")
    assert _merge_cli(capsys, "--config", str(cfg)) == f"{cfg}: 'scale' expects a finite number, got nan"
    assert not (tmp_path / "out").exists()
