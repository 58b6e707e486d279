"""MT-Bench pieces: rating parser, FastChat-exact judge prompts, input errors, resume, endpoint client."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.errors import PivotfuseError
from evals.backends import OpenAIChatClient, parse_spec
from evals.config import EvalConfig
from evals.mtbench import generate_answers, judge_answers, judge_messages, make_matches, parse_rating
from evals.questions import (builtin_judge_prompts, load_judge_prompts, load_questions,
                             load_reference_answers)
from test_eval_fixtures import mt_bench_dir


@pytest.mark.parametrize("text, want", [
    ("The answer is correct and concise.\n\nRating: [[7]]", 7),
    ("Rating: [[8.5]]", 8.5),
    ("The assistant fails to answer. I would rate it low.", -1),
    ("First I thought [[3]], but on reflection the final rating is [[9]].", 3),  # first [[x]] wins
    ("Score [6] out of 10", 6),  # single-bracket fallback
    ("See reference [2], overall Rating: [[10]]", 10),  # [[x]] beats an earlier [x]
    ("Rating: [[ten]]", -1),
])
def test_parse_rating_on_judge_outputs(text, want):
    got = parse_rating(text)
    assert got == want and type(got) is type(want)


def _fill(template: str, **values: str) -> str:
    """Naive FastChat formatting: replace each {placeholder} by hand."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


def test_judge_prompt_is_fastchat_exact():
    root = mt_bench_dir()
    raw = {json.loads(line)["name"]: json.loads(line) for line in open(root / "judge_prompts.jsonl")}
    prompts = load_judge_prompts(root / "judge_prompts.jsonl")
    questions = {q["question_id"]: q for q in load_questions(root / "question.jsonl")}
    refs = load_reference_answers(root / "reference_answer", "gpt-4")
    writing, math_q = questions[81], questions[111]
    answer = ["Aloha! {not a placeholder} Hawaii was lovely.", "A trip: always amazing."]

    user, msgs = judge_messages(prompts["default"], writing, answer, None, multi_turn=False)
    p = raw["single-v1"]
    assert user == _fill(p["prompt_template"], question=writing["turns"][0], answer=answer[0])
    assert user.endswith("[Question]\n" + writing["turns"][0] + "\n\n[The Start of Assistant's Answer]\n"
                         + answer[0] + "\n[The End of Assistant's Answer]")
    assert msgs == [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": user}]

    user, msgs = judge_messages(prompts["math-mt"], math_q, answer, refs[111], multi_turn=True)
    p = raw["single-math-v1-multi-turn"]
    assert user == _fill(p["prompt_template"], question_1=math_q["turns"][0], question_2=math_q["turns"][1],
                         answer_1=answer[0], answer_2=answer[1], ref_answer_1=refs[111][0],
                         ref_answer_2=refs[111][1])
    assert "### Reference answer:\n" + refs[111][1] + "\n\n<|The End of Reference Answer|>" in user
    assert msgs[0] == {"role": "system", "content": p["system_prompt"]} and msgs[1]["content"] == user


def test_matches_follow_fastchat_roles_and_order():
    root = mt_bench_dir()
    questions = [q for q in load_questions(root / "question.jsonl") if q["question_id"] in (81, 101, 111, 131)]
    refs = load_reference_answers(root / "reference_answer" / "gpt-4.jsonl")
    answers = {"m": {q["question_id"]: {} for q in questions}}
    got = [(q["question_id"], role, multi) for q, _, role, multi in
           make_matches(questions, ["m"], answers, load_judge_prompts(root / "judge_prompts.jsonl"), refs)]
    # 81 writing, 131 extraction: general; 101 reasoning, 111 math: reference-based
    assert got == [(81, "default", False), (131, "default", False), (101, "math", False), (111, "math", False),
                   (81, "default-mt", True), (131, "default-mt", True), (101, "math-mt", True),
                   (111, "math-mt", True)]
    q101 = next(q for q in questions if q["question_id"] == 101)
    del q101["reference"]
    with pytest.raises(PivotfuseError, match="question 101 .reasoning. needs a reference"):
        make_matches(questions, ["m"], answers, builtin_judge_prompts(), None)


def test_reference_file_wins_over_question_field(tmp_path):
    root = mt_bench_dir()
    q101 = next(q for q in load_questions(root / "question.jsonl") if q["question_id"] == 101)
    refs = load_reference_answers(root / "reference_answer" / "gpt-4.jsonl")
    assert q101["reference"][0] != refs[101][0]
    cfg = EvalConfig()
    judge = ScriptedBackend("j", lambda msgs: "[[5]]")
    prompts = load_judge_prompts(root / "judge_prompts.jsonl")
    for references, want in ((refs, refs[101]), (None, q101["reference"])):
        out = tmp_path / str(bool(references))
        generate_answers([q101], ScriptedBackend("m", lambda msgs: "Second."), out, cfg)
        path = judge_answers([q101], ["m"], judge, out, cfg, prompts, references)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["judge"] for r in rows] == [["j", "single-math-v1"], ["j", "single-math-v1-multi-turn"]]
        assert "[The Start of Reference Answer]\n" + want[0] + "\n[The End of Reference Answer]" in rows[0]["user_prompt"]


def test_builtin_prompts_have_fastchat_placeholders():
    root = mt_bench_dir()
    fastchat = load_judge_prompts(root / "judge_prompts.jsonl")
    ours = builtin_judge_prompts()
    import string

    for role, p in ours.items():
        fields = {f for _, f, _, _ in string.Formatter().parse(p["prompt_template"]) if f}
        theirs = {f for _, f, _, _ in string.Formatter().parse(fastchat[role]["prompt_template"]) if f}
        assert fields == theirs, role
        assert p["output_format"] == "[[rating]]" and "[[rating]]" in p["prompt_template"] + p["system_prompt"]
        assert p["prompt_template"] != fastchat[role]["prompt_template"]  # our wording, not FastChat's


def test_malformed_question_file_names_the_line(tmp_path):
    good = {"question_id": 1, "category": "writing", "turns": ["Hi"]}
    cases = {
        "bad json": (json.dumps(good) + "\n\n{\"question_id\": 2,\n", ":3: invalid JSON"),
        "no turns": (json.dumps(good) + "\n" + json.dumps({"question_id": 2, "category": "x"}) + "\n",
                     ":2: missing field 'turns'"),
        "turn type": (json.dumps({"question_id": 1, "category": "x", "turns": ["a", 3]}) + "\n",
                      ":1: 'turns' must be a non-empty list of strings"),
        "duplicate": (json.dumps(good) + "\n" + json.dumps(good) + "\n", ":2: duplicate question_id 1"),
    }
    for name, (text, msg) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        path.write_text(text)
        with pytest.raises(PivotfuseError) as err:
            load_questions(path)
        assert str(path) + msg in str(err.value), name
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"name": "single-v1", "type": "single"}) + "\n")
    with pytest.raises(PivotfuseError, match=r"prompts.jsonl:1: judge prompt needs a string 'system_prompt'"):
        load_judge_prompts(prompts)


class ScriptedBackend:
    """A judge/model double that answers from a function and records every batch it gets."""

    def __init__(self, name: str, reply):
        self.name, self.reply, self.calls = name, reply, []

    def chat(self, batch, temperature, max_tokens):
        self.calls.append((batch, temperature, max_tokens))
        return [self.reply(m) for m in batch]


def test_answers_resume_and_temperatures(tmp_path):
    questions = [{"question_id": 1, "category": "writing", "turns": ["Write a haiku.", "Now shorter."]},
                 {"question_id": 2, "category": "math", "turns": ["2+2?"]},
                 {"question_id": 3, "category": "stem", "turns": ["What is DNA?", "Simpler."]}]
    cfg = EvalConfig(batch_size=8, max_new_tokens=33)
    model = ScriptedBackend("m", lambda msgs: f"reply to {msgs[-1]['content']} after {len(msgs)} msgs")
    generate_answers(questions[:2], model, tmp_path, cfg)
    assert [(len(b), t, n) for b, t, n in model.calls] == [(1, 0.7, 33), (1, 0.7, 33), (1, 0.0, 33)]
    assert model.calls[1][0][0][1] == {"role": "assistant", "content": "reply to Write a haiku. after 1 msgs"}
    path = tmp_path / "model_answer" / "m.jsonl"
    with path.open("a") as fh:  # a run killed mid-write leaves a torn line
        fh.write('{"question_id": 3, "answer_')
    model.calls.clear()
    generate_answers(questions, model, tmp_path, cfg)
    assert [t for _, t, _ in model.calls] == [0.1, 0.1]  # only question 3 (stem) was asked
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert rows[0]["choices"] == [{"index": 0, "turns": ["reply to Write a haiku. after 1 msgs",
                                                          "reply to Now shorter. after 3 msgs"]}]

    judge = ScriptedBackend("judge", lambda msgs: "Fine.\nRating: [[6]]" if "haiku" in msgs[-1]["content"] else "meh")
    refs = {2: ["4"]}
    jpath = judge_answers(questions, ["m"], judge, tmp_path, cfg, builtin_judge_prompts(), refs)
    rows = [json.loads(line) for line in jpath.read_text().splitlines()]
    assert jpath.name == "judge_single.jsonl" and len(rows) == 5  # 3 first turns + 2 second turns
    assert set(rows[0]) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    assert {(r["question_id"], r["turn"]): r["score"] for r in rows} == {(1, 1): 6, (2, 1): -1, (3, 1): -1,
                                                                        (1, 2): 6, (3, 2): -1}
    assert all(t == 0.0 and n == cfg.judge_max_tokens for _, t, n in judge.calls)
    judge.calls.clear()
    judge_answers(questions, ["m"], judge, tmp_path, cfg, builtin_judge_prompts(), refs)
    assert judge.calls == []  # all judgments on disk: nothing recomputed


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append((body, self.headers.get("Authorization")))
            srv.inflight += 1
            srv.peak = max(srv.peak, srv.inflight)
            fail = srv.fail_first > 0
            srv.fail_first -= 1
        time.sleep(0.05)
        with srv.lock:
            srv.inflight -= 1
        if fail:
            self.send_response(503)
            self.end_headers()
            return
        reply = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                       "content": "echo: " + body["messages"][-1]["content"]}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.lock, srv.requests, srv.inflight, srv.peak, srv.fail_first = threading.Lock(), [], 0, 0, 0
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_endpoint_client_retries_and_bounds_concurrency(fake_server, monkeypatch):
    monkeypatch.setenv("PF_TEST_KEY", "sekret")
    url = f"http://127.0.0.1:{fake_server.server_address[1]}/v1"
    cfg = EvalConfig(concurrency=2, retries=4, backoff=0.01, api_key_env="PF_TEST_KEY")
    client = OpenAIChatClient(parse_spec(f"judge=openai:my-model@{url}"), cfg)
    fake_server.fail_first = 2  # two 503s, then answers
    batch = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
    assert client.chat(batch, 0.0, 12) == [f"echo: q{i}" for i in range(6)]
    assert len(fake_server.requests) == 8 and fake_server.peak <= 2
    body, auth = fake_server.requests[-1]
    assert auth == "Bearer sekret"
    assert body["model"] == "my-model" and body["max_tokens"] == 12 and body["temperature"] == 0.0


def test_unreachable_endpoint_fails_clearly_after_bounded_retries():
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = EvalConfig(retries=3, backoff=0.05, timeout=2)
    client = OpenAIChatClient(parse_spec(f"openai:gpt-4@http://127.0.0.1:{port}/v1"), cfg)
    t0 = time.perf_counter()
    with pytest.raises(PivotfuseError, match=rf"gpt-4: no answer from http://127.0.0.1:{port}/v1/chat/completions "
                                            r"after 3 tries \(.*refused"):
        client.chat([[{"role": "user", "content": "hi"}]], 0.0, 8)
    assert time.perf_counter() - t0 < 5


def test_specs():
    ref = parse_spec("gpt=openai:gpt-4o@https://example.invalid/v1/")
    assert (ref.name, ref.kind, ref.target, ref.base_url) == ("gpt", "openai", "gpt-4o", "https://example.invalid/v1")
    ref = parse_spec("openai:org/judge-7b", default_base_url="http://127.0.0.1:9/v1")
    assert (ref.name, ref.target, ref.base_url) == ("judge-7b", "org/judge-7b", "http://127.0.0.1:9/v1")
    with pytest.raises(PivotfuseError, match="not a model folder"):
        parse_spec("/no/such/folder")


def test_model_ids_may_hold_at_signs():
    ref = parse_spec("openai:claude-3-5-sonnet@20240620", default_base_url="http://127.0.0.1:9/v1")
    assert (ref.target, ref.base_url) == ("claude-3-5-sonnet@20240620", "http://127.0.0.1:9/v1")
    ref = parse_spec("cf=openai:@cf/meta/llama-3.1-8b@HTTPS://h.example/v1")
    assert (ref.name, ref.target, ref.base_url) == ("cf", "@cf/meta/llama-3.1-8b", "HTTPS://h.example/v1")
    ref = parse_spec("openai:a@b@http://[::1]:8000/v1/")
    assert (ref.target, ref.base_url) == ("a@b", "http://[::1]:8000/v1")


@pytest.mark.parametrize("spec, why", [
    ("openai:x@ftp://127.0.0.1/v1", "'ftp://127.0.0.1/v1' must start with http:// or https://"),
    ("j=openai:x@file:///etc/passwd", "'file:///etc/passwd' must start with http:// or https://"),
    ("openai:x@localhost:8000/v1", "'localhost:8000/v1' must start with http:// or https://"),
    ("openai:x@127.0.0.1/v1", "'127.0.0.1/v1' must start with http:// or https://"),
    ("openai:x@api.example.com/v1", "'api.example.com/v1' must start with http:// or https://"),
    ("openai:x@https://", "'https://' has no host"),
    ("openai:x@http://h:port/v1", "'http://h:port/v1' is not a valid URL"),
    ("openai:x@http://h /v1", "'http://h /v1' is not a valid URL"),
    ("openai:x@http://user:pw@h/v1", "'http://user:pw@h/v1' holds credentials"),
    ("openai:x@http://h/v1?k=1", "'http://h/v1?k=1' has a query or fragment"),
])
def test_unusable_endpoint_urls_are_refused_never_replaced(spec, why, monkeypatch):
    """A URL the client cannot use used to become part of the model id, sent (with the API key)
    to OpenAI's public endpoint: it must be refused, naming the spec."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(PivotfuseError) as e:
        parse_spec(spec)
    assert str(e.value).startswith(f"{spec.removeprefix('j=')!r}: base URL {why}")


def test_default_endpoints_are_checked_too(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "file:///etc")
    with pytest.raises(PivotfuseError, match=r"^'openai:m': base URL 'file:///etc' \(from \$OPENAI_BASE_URL\) "
                                             r"must start with http:// or https://$"):
        parse_spec("openai:m")
    with pytest.raises(PivotfuseError, match=r"^'openai:m': base URL 'gopher://h' \(the default base_url\)"):
        parse_spec("openai:m", default_base_url="gopher://h")
    assert parse_spec("openai:m", default_base_url="http://127.0.0.1:9/v1").base_url == "http://127.0.0.1:9/v1"
    with pytest.raises(PivotfuseError, match=r"^'openai:m@': expected openai:MODEL_ID\[@BASE_URL\]$"):
        parse_spec("openai:m@")
