"""Bad inputs and damaged read-backs: files that are not UTF-8, JSON of the wrong shape, endpoint
bodies that are not UTF-8 JSON or carry no text, answer/judgment/loss/state files with wrong types,
held-out files with nothing to score. Each must end in one line naming the file (and line and
field) with exit code 2 through `cli.main`, never in a traceback or a silently wrong result."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cli import main
from core.errors import PivotfuseError

QUESTIONS = [{"question_id": 1, "category": "arith", "turns": ["What is 2 + 2?", "And times 3?"],
              "reference": ["2 + 2 = 4.", "4 x 3 = 12."]},
             {"question_id": 2, "category": "writing", "turns": ["Say hi."]}]


def cli_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI, expect exit 2 and return its error line (earlier stderr lines are progress bars)."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"pivotfuse {argv[0]}: error: "), err
    return last[len(f"pivotfuse {argv[0]}: error: "):]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer_row(qid, turns) -> dict:
    return {"question_id": qid, "answer_id": "a", "model_id": "m", "choices": [{"index": 0, "turns": turns}],
            "tstamp": 0.0}


# --- 1. files that are not UTF-8 ------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["merge", "--config"], ["run"], ["eval", "loss", "--model", "p=.", "--recipe"],
    ["fuse", "--source", "s", "--recipe"], ["extract", "--model", "p", "--recipe"],
])
def test_yaml_that_is_not_utf8(tmp_path, capsys, argv):
    path = tmp_path / "conf.yaml"
    path.write_bytes(b"out: runs/x\nmodels: [caf\xe9]\n")  # Latin-1 'é'
    assert cli_error(capsys, *argv, str(path)) == f"{path}:2: not UTF-8 text (byte 0xe9 at column 13)"


def test_chat_data_that_is_not_utf8(world, tokenizer_dirs, tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = json.dumps(good).encode().replace(b"hello", b"h\xe9llo")
    data.write_bytes(json.dumps(good).encode() + b"\n" + bad + b"\n")
    want = f"{data}:2: not UTF-8 text (byte 0xe9 at column {bad.index(0xe9) + 1})"
    pivot = str(world / "models" / "pivot")
    assert cli_error(capsys, "extract", "--model", pivot, "--data", str(data), "--out", str(tmp_path / "s")) == want
    llama2 = str(tokenizer_dirs["llama2"])
    assert cli_error(capsys, "align", "--pivot", pivot, "--source", llama2, "--data", str(data),
                     "--out", str(tmp_path / "m.json")) == want
    assert cli_error(capsys, "eval", "loss", "--model", f"p={pivot}", "--data", str(data),
                     "--out", str(tmp_path / "ev")) == want
    template = tmp_path / "t.jinja"
    template.write_bytes(b"{{ messages[0]['content'] }}\x80")
    assert cli_error(capsys, "extract", "--model", pivot, "--data", str(data), "--chat-template", str(template),
                     "--out", str(tmp_path / "s")) == f"{template}:1: not UTF-8 text (byte 0x80 at column 29)"


def test_mtbench_inputs_that_are_not_utf8(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    line = b'{"question_id": 1, "category": "writing", "turns": ["\xff"]}'
    bad.write_bytes(line + b"\n")
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    model = ["--model", "m=openai:m@http://127.0.0.1:9/v1", "--out", str(tmp_path / "out")]
    want = f"{bad}:1: not UTF-8 text (byte 0xff at column {line.index(0xff) + 1})"
    assert cli_error(capsys, "eval", "mtbench", *model, "--questions", str(bad), "--answer-only") == want
    assert cli_error(capsys, "eval", "mtbench", *model, "--questions", str(questions), "--judge",
                     "j=openai:j@http://127.0.0.1:9/v1", "--judge-prompts", str(bad)) == want
    assert cli_error(capsys, "eval", "mtbench", *model, "--questions", str(questions), "--judge", "reference",
                     "--reference", str(bad)) == want
    assert not (tmp_path / "out" / "model_answer").exists()  # refused before answering


# --- 2. endpoint bodies and replies ---------------------------------------------------------------

class _Body(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.calls += 1
        data = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def endpoint():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Body)
    srv.body, srv.calls = b"", 0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


def _reply(content, **extra) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content, **extra},
                                    "finish_reason": "length"}]}).encode()


@pytest.mark.parametrize("body, message", [
    (b'{"choices": "\xff"}', "reply body: not UTF-8 text (byte 0xff at offset 13)"),
    (b"<html>Bad gateway</html>", "did not answer JSON (Expecting value): '<html>Bad gateway</html>'"),
    (_reply(None), "'choices[0].message.content' must be a string, got None (finish_reason 'length')"),
    (_reply(None, refusal="I can't."),
     "'choices[0].message.content' must be a string, got None (refusal \"I can't.\", finish_reason 'length')"),
    (_reply([{"type": "text", "text": "4"}]),
     "'choices[0].message.content' must be a string, got [{'type': 'text', 'text': '4'}] (finish_reason 'length')"),
    (_reply(4), "'choices[0].message.content' must be a string, got 4 (finish_reason 'length')"),
    (b'{"choices": []}', "no choices[0].message.content in {'choices': []}"),
])
def test_bad_model_reply_is_refused(endpoint, tmp_path, capsys, body, message):
    endpoint.body = body
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out"
    err = cli_error(capsys, "eval", "mtbench", "--model", f"m=openai:m@{endpoint.url}", "--questions", str(questions),
                    "--answer-only", "--concurrency", "1", "--out", str(out))
    assert err == f"m: {endpoint.url}/chat/completions{': ' if message[0] != 'd' else ' '}{message}"
    assert endpoint.calls == 1  # not retried: a malformed answer is not a network hiccup
    answers = out / "model_answer" / "m.jsonl"
    assert not answers.exists() or answers.read_text() == ""  # nothing written in place of an answer


def test_bad_judge_reply_is_refused_and_empty_text_is_kept(endpoint, tmp_path, capsys):
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out"
    endpoint.body = _reply("")  # an empty answer is still text: kept as before
    argv = ["eval", "mtbench", "--model", f"m=openai:m@{endpoint.url}", "--questions", str(questions),
            "--concurrency", "1", "--out", str(out)]
    assert main([*argv, "--answer-only"]) == 0
    rows = [json.loads(line) for line in (out / "model_answer" / "m.jsonl").read_text().splitlines()]
    assert [r["choices"][0]["turns"] for r in rows] == [["", ""], [""]]
    endpoint.body = _reply(None)
    err = cli_error(capsys, *argv, "--judge", f"j=openai:j@{endpoint.url}")
    assert err == f"j: {endpoint.url}/chat/completions: 'choices[0].message.content' must be a string, got None " \
                  "(finish_reason 'length')"
    judgments = out / "model_judgment" / "j_single.jsonl"
    assert not judgments.exists() or judgments.read_text() == ""


# --- 3./4. answer and judgment files read back ----------------------------------------------------

@pytest.mark.parametrize("lines, message", [
    ([json.dumps(answer_row(1, [1, None]))], ":1: 'choices[0].turns[0]' must be a string, got 1"),
    ([json.dumps(answer_row(2, ["hi"])), json.dumps(answer_row(1, ["4", None]))],
     ":2: 'choices[0].turns[1]' must be a string, got None"),
    ([json.dumps(answer_row(1, "4"))], ":1: 'choices[0].turns' must be a list of strings, got '4'"),
    ([json.dumps({**answer_row(1, ["4"]), "choices": "x"})], ":1: 'choices' must be a non-empty list of objects"),
    ([json.dumps({"answer_id": "a", "choices": [{"turns": ["4"]}]})], ":1: missing field 'question_id'"),
    ([json.dumps(answer_row([1], ["4"]))], ":1: 'question_id' must be an integer or a string, got [1]"),
    ([json.dumps(answer_row(2, ["hi"])), "[1, 2]"], ":2: expected a JSON object, got list"),
    (['{"question_id": 1, "choices": [{"turns": ["4 \udcff"]}]}'], ":1: not UTF-8 text (byte 0xff at column 46)"),
    (['{"question_id": ', json.dumps(answer_row(2, ["hi"]))], ":1: invalid JSON (Expecting value)"),
])
def test_bad_answer_file_is_refused(endpoint, tmp_path, capsys, lines, message):
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    path = tmp_path / "out" / "model_answer" / "m.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))
    before = path.read_bytes()
    err = cli_error(capsys, "eval", "mtbench", "--model", f"m=openai:m@{endpoint.url}", "--questions", str(questions),
                    "--judge", "reference", "--out", str(tmp_path / "out"))
    assert err.startswith(f"{path}{message}") and err.endswith("; delete the file to recompute")
    assert path.read_bytes() == before and endpoint.calls == 0  # nothing asked, nothing rewritten


def test_torn_last_answer_line_is_dropped_even_inside_a_character(tmp_path):
    from evals.config import EvalConfig
    from evals.mtbench import generate_answers

    class Echo:
        name, asked = "m", []

        def chat(self, batch, temperature, max_tokens):
            self.asked += [m[-1]["content"] for m in batch]
            return ["ok"] * len(batch)

    path = tmp_path / "model_answer" / "m.jsonl"
    path.parent.mkdir()
    kept = json.dumps(answer_row(1, ["4", "12"]))
    path.write_bytes(kept.encode() + b"\n" + '{"question_id": 2, "choices": [{"turns": ["é'.encode()[:-1])
    backend = Echo()
    generate_answers(QUESTIONS, backend, tmp_path, EvalConfig())
    assert backend.asked == ["Say hi."]  # question 1 was on disk, the torn row of question 2 was redone
    lines = path.read_text().splitlines()
    assert lines[0] == kept and json.loads(lines[1])["choices"] == [{"index": 0, "turns": ["ok"]}]


def test_answer_with_too_few_turns_is_refused_by_the_judge(tmp_path):
    from evals.reference_judge import judge_by_reference

    path = write_jsonl(tmp_path / "model_answer" / "m.jsonl", [answer_row(1, ["4"]), answer_row(2, ["hi"])])
    with pytest.raises(PivotfuseError) as e:
        judge_by_reference(QUESTIONS, ["m"], tmp_path)
    assert str(e.value) == f"{path}: the answer to question 1 has 1 turns, the question 2: " \
                           "rerun `eval mtbench` to answer it again"


def _judgment(**change) -> dict:
    row = {"question_id": 1, "model": "m", "judge": ["gpt-4", "single-v1"], "user_prompt": "", "judgment": "",
           "score": 7, "turn": 1, "tstamp": 0}
    return {**row, **change}


@pytest.mark.parametrize("row, message", [
    (_judgment(turn=3), ":2: 'turn' must be 1 or 2, got 3"),
    (_judgment(turn=True), ":2: 'turn' must be 1 or 2, got True"),
    (_judgment(score="7"), ":2: 'score' must be a number, got '7'"),
    (_judgment(judge="gpt-4"), ":2: 'judge' must be a [judge, prompt name] pair of strings, got 'gpt-4'"),
    (_judgment(model=None), ":2: 'model' must be a string, got None"),
    ({k: v for k, v in _judgment().items() if k != "score"}, ":2: missing field 'score'"),
])
def test_bad_judgment_file_is_refused(tmp_path, capsys, row, message):
    path = write_jsonl(tmp_path / "model_judgment" / "gpt-4_single.jsonl", [_judgment(), row])
    err = cli_error(capsys, "eval", "report", "--out", str(tmp_path))
    assert err == f"{path}{message}; delete the file to recompute"


def test_judgment_file_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "model_judgment").mkdir()
    path = tmp_path / "model_judgment" / "reference_single.jsonl"
    bad = json.dumps(_judgment(judgment="x")).encode().replace(b'"x"', b'"\xc3("')  # 0xc3 starts a 2-byte char
    path.write_bytes(json.dumps(_judgment()).encode() + b"\n" + bad + b"\n")
    assert cli_error(capsys, "eval", "report", "--out", str(tmp_path)) == \
        f"{path}:2: not UTF-8 text (byte 0xc3 at column {bad.index(0xc3) + 1}); delete the file to recompute"


# --- 3. loss.json ---------------------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    (b'{"models": {"p": {"arith": {"bits_per_byte": 1.0, "note": "\xe9"}}}}', ":1: not UTF-8 text (byte 0xe9 at column 60)"),
    (b'{"models": {"p": \n  {"arith": }}}', ":2: invalid JSON (Expecting value)"),
    (b"[]", ": expected a JSON object at the top level, got list"),
    (b'{"models": []}', ": 'models' must be a mapping of model names to domains, got []"),
    (b'{"unit": "bits"}', ": missing field 'models'"),
    (b'{"models": {"p": 3}}', ": 'models.p' must be a mapping of domains, got 3"),
    (b'{"models": {"p": {"arith": 1.2}}}', ": 'models.p.arith' must be a mapping, got 1.2"),
    (b'{"models": {"p": {"arith": {"bits_per_byte": "x"}}}}', ": 'models.p.arith.bits_per_byte' must be a number, got 'x'"),
])
def test_bad_loss_file_is_refused(tmp_path, capsys, data, message):
    (tmp_path / "loss.json").write_bytes(data)
    assert cli_error(capsys, "eval", "report", "--out", str(tmp_path)) == f"{tmp_path / 'loss.json'}{message}"


# --- 5. held-out files with nothing to score ------------------------------------------------------

def _chat(domain: str, reply: str | None, user: str = "What is 2 + 2?") -> dict:
    msgs = [{"role": "user", "content": user}] + ([{"role": "assistant", "content": reply}] if reply is not None else [])
    return {"domain": domain, "messages": msgs}


def test_heldout_without_assistant_text_is_refused(world, tmp_path, capsys):
    pivot = f"pivot={world / 'models' / 'pivot'}"
    out = tmp_path / "ev"
    data = write_jsonl(tmp_path / "h.jsonl", [_chat("arith", "4."), _chat("chat", None), _chat("chat", "  ")])
    assert cli_error(capsys, "eval", "loss", "--model", pivot, "--data", str(data), "--out", str(out)) == \
        f"{data}: domain 'chat' has no assistant text (2 chats): nothing to score; give its chats assistant turns " \
        "or leave them out"
    data = write_jsonl(tmp_path / "none.jsonl", [_chat("arith", None), _chat("facts", None)])
    assert cli_error(capsys, "eval", "loss", "--model", pivot, "--data", str(data), "--out", str(out)) == \
        f"{data}: no chat has an assistant turn with text: nothing to score"
    # every reply cut off by max_length: nothing scored for that model, so no number either
    data = write_jsonl(tmp_path / "long.jsonl", [_chat("arith", "4.", user="Add these numbers please: " * 20)])
    assert cli_error(capsys, "eval", "loss", "--model", pivot, "--data", str(data), "--max-length", "8",
                     "--out", str(out)) == \
        f"pivot on {data} (max_length 8): no assistant text of domain 'arith' is left to score in its 1 chats " \
        "(replies cut off by max_length count nothing)"
    assert not (out / "loss.json").exists()


def test_saved_loss_file_is_checked_before_any_model_loads(world, tmp_path, capsys):
    data = write_jsonl(tmp_path / "h.jsonl", [_chat("arith", "4.")])
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "loss.json").write_text('{"data": "x", "models": {"pivot": {"arith": {"bits_per_byte": null}}}}')
    assert cli_error(capsys, "eval", "loss", "--model", f"pivot={world / 'models' / 'pivot'}", "--data", str(data),
                     "--out", str(tmp_path / "ev")) == \
        f"{tmp_path / 'ev' / 'loss.json'}: 'models.pivot.arith.bits_per_byte' must be a number, got None"
