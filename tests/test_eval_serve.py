"""End to end against a real OpenAI-compatible server: `transformers serve` on 127.0.0.1, offline,
answering and judging real MT-Bench questions through `pivotfuse eval mtbench`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cli import main
from evals.backends import LocalChatModel, parse_spec
from evals.config import EvalConfig
from evals.mtbench import judge_messages
from evals.questions import load_judge_prompts, load_reference_answers
from test_eval_fixtures import mt_bench_dir, tiny_qwen  # noqa: F401 - fixture

pytestmark = pytest.mark.slow

ANSWER_FIELDS = {"question_id", "answer_id", "model_id", "choices", "tstamp"}  # FastChat gen_model_answer
JUDGMENT_FIELDS = {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}


@pytest.fixture(scope="module")
def server(tiny_qwen):  # noqa: F811
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists() and not shutil.which("transformers"):
        pytest.skip("`transformers serve` is not installed (pip install 'transformers[serving]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    log = open(tiny_qwen.parent / "serve.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([str(exe) if exe.exists() else "transformers", "serve", str(tiny_qwen), "--host",
                             "127.0.0.1", "--port", str(port), "--device", "cpu"], stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"transformers serve did not start: {(tiny_qwen.parent / 'serve.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_mtbench_through_transformers_serve(server, tiny_qwen, tmp_path):  # noqa: F811
    root = mt_bench_dir()
    picked = [json.loads(line) for line in open(root / "question.jsonl")]
    picked = [q for q in picked if q["question_id"] in (81, 101, 111)]  # writing, reasoning, math
    qfile = tmp_path / "question.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in picked))
    out = tmp_path / "out"
    endpoint = f"openai:{tiny_qwen}@{server}"  # the server is pinned to the folder's path as model id
    argv = ["eval", "mtbench", "--model", f"served={endpoint}", "--judge", f"tiny-judge={endpoint}",
            "--questions", str(qfile), "--judge-prompts", str(root / "judge_prompts.jsonl"),
            "--reference", str(root / "reference_answer"), "--max-new-tokens", "8", "--judge-max-tokens", "8",
            "--concurrency", "2", "--out", str(out)]
    assert main(argv) == 0

    answers = [json.loads(line) for line in (out / "model_answer" / "served.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 101, 111]
    for a in answers:
        assert set(a) == ANSWER_FIELDS and a["model_id"] == "served"
        assert [set(c) for c in a["choices"]] == [{"index", "turns"}] and len(a["choices"][0]["turns"]) == 2
    # greedy categories (reasoning, math): the server's replies are the model's own greedy replies
    local = LocalChatModel(parse_spec(str(tiny_qwen)), EvalConfig(dtype="float32"))
    for a, q in zip(answers[1:], picked[1:]):
        first = local.chat([[{"role": "user", "content": q["turns"][0]}]], 0.0, 8)[0]
        assert first and a["choices"][0]["turns"][0].strip() == first  # endpoint text is kept as sent

    jfile = out / "model_judgment" / "tiny-judge_single.jsonl"
    rows = [json.loads(line) for line in jfile.read_text().splitlines()]
    assert all(set(r) == JUDGMENT_FIELDS for r in rows)
    assert sorted((r["question_id"], r["turn"], tuple(r["judge"])) for r in rows) == [
        (81, 1, ("tiny-judge", "single-v1")), (81, 2, ("tiny-judge", "single-v1-multi-turn")),
        (101, 1, ("tiny-judge", "single-math-v1")), (101, 2, ("tiny-judge", "single-math-v1-multi-turn")),
        (111, 1, ("tiny-judge", "single-math-v1")), (111, 2, ("tiny-judge", "single-math-v1-multi-turn"))]
    prompts = load_judge_prompts(root / "judge_prompts.jsonl")
    refs = load_reference_answers(root / "reference_answer")
    by_q = {a["question_id"]: a["choices"][0]["turns"] for a in answers}
    for r in rows:
        q = next(q for q in picked if q["question_id"] == r["question_id"])
        role = ("math" if q["category"] != "writing" else "default") + ("-mt" if r["turn"] == 2 else "")
        ref = refs[q["question_id"]] if role.startswith("math") else None
        assert r["user_prompt"] == judge_messages(prompts[role], q, by_q[q["question_id"]], ref, r["turn"] == 2)[0]
        assert r["score"] in (-1,) or 0 <= r["score"] <= 10

    before = jfile.read_text(), (out / "model_answer" / "served.jsonl").read_text()
    assert main(argv) == 0  # resume: everything is on disk, nothing is asked again
    assert (jfile.read_text(), (out / "model_answer" / "served.jsonl").read_text()) == before
    assert main(["eval", "report", "--out", str(out)]) == 0
    assert "| served |" in (out / "report.md").read_text() and (out / "report.png").is_file()
