"""`pivotfuse eval` over the demo world's models: held-out loss per domain (checked against the
world's own recorded losses) and the demo question set answered and judged in-process."""

from __future__ import annotations

import json

import pytest

from cli import main

pytestmark = pytest.mark.slow
MODELS = ("pivot", "arith", "facts", "strings")


def test_eval_loss_over_world_models(world, tmp_path):
    argv = ["eval", "loss", "--data", str(world / "data" / "heldout.jsonl"), "--out", str(tmp_path), "--batch-size", "16"]
    for name in MODELS:
        argv += ["--model", f"{name}={world / 'models' / name}"]
    assert main(argv) == 0
    loss = json.loads((tmp_path / "loss.json").read_text())["models"]
    recorded = {m["name"]: m["heldout_nats_per_char"] for m in json.loads((world / "world.json").read_text())["models"]}
    for name in MODELS:
        for domain, want in recorded[name].items():  # the world measured the same quantity its own way
            assert loss[name][domain]["nats_per_char"] == pytest.approx(want, abs=1e-3), (name, domain)
            assert loss[name][domain]["bytes"] == loss["pivot"][domain]["bytes"]  # same denominator for all
    for skill in ("arith", "facts", "strings"):  # each source is the expert of its domain
        assert loss[skill][skill]["bits_per_byte"] == min(loss[m][skill]["bits_per_byte"] for m in MODELS)
    assert main(["eval", "report", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert all(f"| {m} |" in md for m in MODELS) and (tmp_path / "report.png").stat().st_size > 0


def test_demo_questions_answered_and_judged_on_world(world, tmp_path):
    out = tmp_path / "out"
    argv = ["eval", "mtbench", "--model", f"arith={world / 'models' / 'arith'}",
            "--judge", f"pivot-judge={world / 'models' / 'pivot'}",
            "--questions", "demo", "--demo-facts", str(world / "data" / "heldout.jsonl"),
            "--max-new-tokens", "24", "--judge-max-tokens", "16", "--out", str(out)]
    assert main(argv) == 0
    answers = [json.loads(line) for line in (out / "model_answer" / "arith.jsonl").read_text().splitlines()]
    assert len(answers) == 20 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    arith_ok = 0
    for a in answers[:5]:  # the arith questions come first; their first turn asks for a sum/difference/product
        arith_ok += any(ch.isdigit() for ch in a["choices"][0]["turns"][0])
    assert arith_ok >= 3  # the arithmetic expert answers with numbers
    rows = [json.loads(line) for line in (out / "model_judgment" / "pivot-judge_single.jsonl").read_text().splitlines()]
    assert len(rows) == 20 * 2  # 20 questions, two turns
    assert {r["judge"][1] for r in rows} == {"pivotfuse-single-v1", "pivotfuse-single-ref-v1",
                                             "pivotfuse-single-v1-multi-turn", "pivotfuse-single-ref-v1-multi-turn"}
    assert all(r["score"] == -1 or 0 <= r["score"] <= 10 for r in rows)
