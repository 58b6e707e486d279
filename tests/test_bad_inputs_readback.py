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


# --- 3. store manifests, vocabulary maps, merge state, steps.json, alignment checkpoints --------------

def _manifest(**change) -> dict:
    m = {"format": "pivotfuse-logit-store", "version": 1, "fingerprint": {"model": "x"}, "top_k": 10, "n_rows": 4,
         "shard_size": 2, "n_shards": 2, "dtypes": {"ids": "uint16", "spans": "uint16"}, "complete": False}
    return {**m, **change}


@pytest.mark.parametrize("data, message", [
    (json.dumps(_manifest(model="caf\udce9"), ensure_ascii=False).encode("utf-8", "surrogateescape"),
     ":1: not UTF-8 text (byte 0xe9"),
    (b"[1, 2]", ": expected a store manifest (JSON object) at the top level, got list"),
    (json.dumps(_manifest(top_k="10")).encode(), ": 'top_k' must be a positive integer, got '10'"),
    (json.dumps(_manifest(n_rows=-1)).encode(), ": 'n_rows' must be a non-negative integer, got -1"),
    (json.dumps(_manifest(fingerprint=["x"])).encode(), ": 'fingerprint' must be a mapping, got ['x']"),
    (json.dumps(_manifest(dtypes={"ids": "int8", "spans": "uint16"})).encode(),
     ": 'dtypes.ids' must be 'uint16' or 'int32', got 'int8'"),
    (json.dumps(_manifest(complete="yes")).encode(), ": 'complete' must be true or false, got 'yes'"),
    (json.dumps(_manifest(complete=True)).encode(), ": missing field 'stats'"),
    (json.dumps(_manifest(complete=True, stats={"rows": 4})).encode(), ": missing field 'stats.stored'"),
])
def test_bad_store_manifest_is_refused(tmp_path, data, message):
    from fuse.extract.store import LogitStore

    (tmp_path / "manifest.json").write_bytes(data)
    with pytest.raises(PivotfuseError) as e:
        LogitStore(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'manifest.json'}{message}")


def test_bad_store_manifest_through_extract(world, tmp_path, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [_chat("arith", "4.")])
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps(_manifest(shard_size=0)))
    assert cli_error(capsys, "extract", "--model", str(world / "models" / "pivot"), "--data", str(data),
                     "--out", str(store)) == f"{store / 'manifest.json'}: 'shard_size' must be a positive integer, got 0"


def test_bad_shard_statistics_are_refused(tmp_path):
    from fuse.extract.store import StoreWriter

    writer = StoreWriter.open(tmp_path, {"model": "x"}, top_k=2, n_rows=1, shard_size=1,
                              dtypes={"ids": "uint16", "spans": "uint16"}, info={}, is_main=True)
    writer.shard_path(0).write_bytes(b"")  # the shard is "there"; its statistics are damaged
    writer.shard_path(0).with_suffix(".json").write_text('{"rows": "1"}')
    with pytest.raises(PivotfuseError, match=r"shards/00000.json: 'rows' must be a number, got '1'$"):
        writer.finalize()


def test_bad_vocab_map_is_refused(tmp_path):
    from fuse.align.vocab import VocabMap

    good = {"format": "pivotfuse-vocab-map", "version": 1, "fingerprint": "f", "pivot": {"vocab_size": 3},
            "source": {}, "stats": {}, "map": [0, -1], "how": "x-", "evidence": []}
    path = tmp_path / "map.json"
    cases = [
        (json.dumps({**good, "fingerprint": "caf\udce9"}, ensure_ascii=False).encode("utf-8", "surrogateescape"),
         ":1: not UTF-8 text (byte 0xe9 at column"),
        (b"[]", ": expected a vocabulary map (JSON object) at the top level, got list"),
        (json.dumps({**good, "pivot": [3]}).encode(), ": 'pivot' must be a mapping, got [3]"),
        (json.dumps({**good, "stats": "none"}).encode(), ": 'stats' must be a mapping, got 'none'"),
        (json.dumps({**good, "evidence": [[1, 0]]}).encode(),
         ": 'evidence' must be a list of [source id, pivot id, count] integer triples, got [[1, 0]]"),
        (json.dumps({**good, "fingerprint": 7}).encode(), ": 'fingerprint' must be a string, got 7"),
        (json.dumps({**good, "map": [0, True]}).encode(), ": 'map' must be a list of integers"),
    ]
    for data, message in cases:
        path.write_bytes(data)
        with pytest.raises(PivotfuseError) as e:
            VocabMap.load(path)
        assert str(e.value).startswith(f"{path}{message}"), (message, str(e.value))
    path.write_text(json.dumps(good))
    assert VocabMap.load(path).mapping.tolist() == [0, -1]


@pytest.fixture
def interrupted_merge(tmp_path, monkeypatch, capsys):
    """A ties merge stopped after 4 tensors: (argv, partial folder)."""
    from merge import methods
    from test_merge_fixtures import build_family

    base, targets = build_family(tmp_path / "models", k=2)
    argv = ["merge", "--base", str(base), "--models", *map(str, targets), "--method", "ties", "--density", "0.5",
            "--out", str(tmp_path / "out"), "--quiet"]
    real, calls = methods.METHODS["ties"], {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setitem(methods.METHODS, "ties", flaky)
    assert main(argv) == 130
    monkeypatch.setitem(methods.METHODS, "ties", real)
    partial = tmp_path / ".out.partial"
    assert len((partial / ".progress.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    return argv, partial


def test_damaged_merge_state_is_refused(interrupted_merge, capsys):
    argv, partial = interrupted_merge
    state, log = partial / ".pivotfuse-merge.json", partial / ".progress.jsonl"
    good_state, good_log = state.read_bytes(), log.read_bytes()
    lines = good_log.splitlines(keepends=True)
    hint = f"; delete {partial} to start the merge over"
    cases = [
        (state, b'{"fingerprint": "\xff"}', f"{state}:1: not UTF-8 text (byte 0xff at column 18){hint}"),
        (state, b'["fingerprint"]', f"{state}: expected a merge state (JSON object) at the top level, got list{hint}"),
        (state, b'{"fingerprint": 3}', f"{state}: 'fingerprint' must be a string, got 3{hint}"),
        (log, lines[0] + b'{"name": 5}\n' + lines[2], f"{log}:2: 'name' must be a string, got 5{hint}"),
        (log, lines[0] + lines[1].replace(b"]", b', "x"]', 1), f"{log}:2: 'weights' must be a list of numbers"),
        (log, lines[0] + b'{"name": "\xfe"}\n' + lines[2], f"{log}:2: not UTF-8 text (byte 0xfe at column 11){hint}"),
        (log, lines[0] + b"[]\n", f"{log}:2: expected a JSON object, got list{hint}"),
        (log, b'{"name": \n' + lines[1], f"{log}:1: invalid JSON (Expecting value){hint}"),
    ]
    for file, data, message in cases:
        state.write_bytes(good_state)
        log.write_bytes(good_log)
        file.write_bytes(data)
        assert cli_error(capsys, *argv).startswith(message), message
        assert file.read_bytes() == data  # left for the user to look at
    # a torn last line (killed mid-write) is redone, and the finished merge equals an uninterrupted one
    state.write_bytes(good_state)
    log.write_bytes(good_log + b'{"name": "model.lay')
    assert main(argv) == 0 and not partial.exists()
    out = partial.parent / "out"
    assert main([*argv[:-3], "--out", str(partial.parent / "full"), "--quiet"]) == 0
    for f in ("model.safetensors", "config.json"):
        assert (out / f).read_bytes() == (partial.parent / "full" / f).read_bytes()


def test_torn_merge_log_is_cut_before_new_records(interrupted_merge, monkeypatch):
    """Two interrupted runs in a row: the second run's records must not follow the first one's torn
    line on the same line, where a third run would take them for damage."""
    from merge import methods

    argv, partial = interrupted_merge
    log = partial / ".progress.jsonl"
    log.write_bytes(log.read_bytes() + b'{"name": "mod')
    real, calls = methods.METHODS["ties"], {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setitem(methods.METHODS, "ties", flaky)
    assert main(argv) == 130
    lines = log.read_text().splitlines()
    assert all(json.loads(line)["name"] for line in lines) and len(lines) >= 6
    monkeypatch.setitem(methods.METHODS, "ties", real)
    assert main(argv) == 0 and not partial.exists()


@pytest.mark.parametrize("data, message", [
    (b'{"eval": "\x81"}', ":1: not UTF-8 text (byte 0x81 at column 11)"),
    (b'{"eval": ', ":1: invalid JSON (Expecting value)"),
    (b'["eval"]', ": expected a mapping of steps to fingerprints at the top level, got list"),
    (b'{"eval": 12}', ": step 'eval' must map to a fingerprint string, got 12; delete the file to redo every step"),
])
def test_bad_steps_file_is_refused(tmp_path, capsys, data, message):
    for name in ("p", "s"):
        (tmp_path / name).mkdir()
    write_jsonl(tmp_path / "f.jsonl", [_chat("arith", "4.")])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"out: {tmp_path / 'run'}\nmodels:\n  pivot: {{name: p, path: {tmp_path / 'p'}}}\n"
                      f"  sources: [{{name: s, path: {tmp_path / 's'}}}]\ndata: {{fusion: {tmp_path / 'f.jsonl'}}}\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "steps.json").write_bytes(data)
    assert cli_error(capsys, "run", str(recipe)) == f"{tmp_path / 'run' / 'steps.json'}{message}"


def test_damaged_alignment_checkpoint_is_refused(tokenizer_dirs, tmp_path, monkeypatch, capsys):
    import fuse.align.chat as chat_align
    from test_align_cli import write_chats
    from test_align_vocab import CHATML, INST

    (tmp_path / "chatml.jinja").write_text(CHATML)
    (tmp_path / "inst.jinja").write_text(INST)
    llama2 = str(tokenizer_dirs["llama2"])
    out = tmp_path / "m.json"
    argv = ["align", "--pivot", llama2, "--source", llama2, "--pivot-chat-template", str(tmp_path / "chatml.jinja"),
            "--source-chat-template", str(tmp_path / "inst.jinja"), "--data", str(write_chats(tmp_path / "c.jsonl", 6)),
            "--checkpoint-every", "2", "--out", str(out)]
    real, calls = chat_align.align_chat, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(chat_align, "align_chat", flaky)
    assert main(argv) == 130
    monkeypatch.setattr(chat_align, "align_chat", real)
    partial = tmp_path / "m.json.partial"
    good = json.loads(partial.read_text())
    assert good["done"] == 2
    where = f"{partial} (delete it to align from the start)"
    cases = [
        (b'{"fingerprint": "\xff"}', f"{partial}:1: not UTF-8 text (byte 0xff at column 18)"),
        (b"[]", f"{partial}: expected an alignment checkpoint (JSON object) at the top level, got list"),
        (json.dumps({**good, "done": 99}).encode(), f"{where}: 'done' must be 0..6, got 99"),
        (json.dumps({**good, "skipped": "0"}).encode(), f"{where}: 'skipped' must be 0..2, got '0'"),
        (json.dumps({**good, "coverage": []}).encode(), f"{where}: 'coverage' must be a mapping, got []"),
        (json.dumps({**good, "builder": {**good["builder"], "counts": {"x": {}}}}).encode(),
         f"{where}: damaged 'builder' or 'coverage' counts (ValueError: invalid literal for int()"),
    ]
    for data, message in cases:
        partial.write_bytes(data)
        assert cli_error(capsys, *argv).startswith(message), message
    partial.write_text(json.dumps(good))
    assert main(argv) == 0 and out.is_file() and not partial.exists()
