"""Read MT-Bench-style inputs in FastChat's formats, with `file:line` in every error.

- questions: `question_id`, `category`, `turns: [str, ...]`, optional `reference: [str, ...]`;
- judge prompts: `name`, `type`, `system_prompt`, `prompt_template`, `output_format`;
- reference answers: FastChat answer rows (`question_id`, `choices: [{turns: [...]}]`).

Without a prompts file, `builtin_judge_prompts()` gives pivotfuse's own single-answer prompts:
our wording, FastChat's semantics (same placeholders, the four roles, `[[rating]]` output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.files import read_jsonl
from core.errors import PivotfuseError

# judge role -> FastChat prompt name (gen_judgment.make_judge_single)
FASTCHAT_SINGLE_PROMPTS = {"default": "single-v1", "math": "single-math-v1",
                           "default-mt": "single-v1-multi-turn", "math-mt": "single-math-v1-multi-turn"}
_PROMPT_KEYS = ("name", "type", "system_prompt", "prompt_template", "output_format")


def _str_list(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise PivotfuseError(f"{where}: '{key}' must be a non-empty list of strings")
    return value


def load_questions(path: str | Path) -> list[dict]:
    """FastChat `question.jsonl` → list of question dicts (order kept, ids unique)."""
    questions, seen = [], set()
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        for key in ("question_id", "category", "turns"):
            if key not in row:
                raise PivotfuseError(f"{where}: missing field '{key}'")
        qid = row["question_id"]
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise PivotfuseError(f"{where}: 'question_id' must be an integer or a string, got {qid!r}")
        if qid in seen:
            raise PivotfuseError(f"{where}: duplicate question_id {qid!r}")
        seen.add(qid)
        if not isinstance(row["category"], str):
            raise PivotfuseError(f"{where}: 'category' must be a string")
        _str_list(row["turns"], where, "turns")
        if "reference" in row and row["reference"] is not None:
            _str_list(row["reference"], where, "reference")
        questions.append(row)
    if not questions:
        raise PivotfuseError(f"{path}: no questions")
    return questions


def load_judge_prompts(path: str | Path) -> dict[str, dict]:
    """FastChat `judge_prompts.jsonl` → {name: prompt}; the four single-answer prompts must be there."""
    prompts = {}
    for n, row in read_jsonl(path):
        missing = [k for k in _PROMPT_KEYS if not isinstance(row.get(k), str)]
        if missing:
            raise PivotfuseError(f"{path}:{n}: judge prompt needs a string '{missing[0]}'")
        prompts[row["name"]] = row
    absent = [name for name in FASTCHAT_SINGLE_PROMPTS.values() if name not in prompts]
    if absent:
        raise PivotfuseError(f"{path}: no judge prompt named {absent[0]!r} (single-answer grading needs "
                             f"{', '.join(FASTCHAT_SINGLE_PROMPTS.values())})")
    for name in FASTCHAT_SINGLE_PROMPTS.values():
        if prompts[name]["output_format"] != "[[rating]]":
            raise PivotfuseError(f"{path}: prompt {name!r} has output_format "
                                 f"{prompts[name]['output_format']!r}, expected '[[rating]]'")
    return {role: prompts[name] for role, name in FASTCHAT_SINGLE_PROMPTS.items()}


def load_reference_answers(path: str | Path, judge_name: str | None = None) -> dict[Any, list[str]]:
    """Reference answers → {question_id: turns}.

    `path` is a FastChat answer file, or a `reference_answer/` folder: FastChat keys references
    by judge model (`<judge>.jsonl`); we take that file when present, else the only file there.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        named = [f for f in files if judge_name and f.stem == judge_name]
        if named:
            p = named[0]
        elif len(files) == 1:
            p = files[0]
        else:
            raise PivotfuseError(f"{path}: expected {judge_name}.jsonl or exactly one .jsonl file, "
                                 f"found {[f.name for f in files]}")
    refs: dict[Any, list[str]] = {}
    for n, row in read_jsonl(p):
        where = f"{p}:{n}"
        try:
            turns = row["choices"][0]["turns"]
            qid = row["question_id"]
        except (KeyError, IndexError, TypeError):
            raise PivotfuseError(f"{where}: reference needs 'question_id' and 'choices[0].turns'") from None
        refs[qid] = _str_list(turns, where, "choices[0].turns")
    return refs


_OWN_SYSTEM = "You are an impartial evaluator of AI assistant answers."
_RATE = ("When your explanation is done, give your rating from 1 to 10 in exactly this form: "
         "\"[[rating]]\", e.g. \"Rating: [[6]]\".")
_GENERAL = ("Judge how good the AI assistant's answer to the user question below is: is it helpful, "
            "relevant, accurate, deep enough, creative and detailed where that matters? ")
_REFERENCE = ("Judge whether the AI assistant's answer is correct and helpful. You are given a reference "
              "answer and the assistant's answer: compare them, and point out and fix any mistake. ")
_CONV = ("[Conversation between the user and the assistant]\n\nUser: {question_1}\n\nAssistant: {answer_1}"
         "\n\nUser: {question_2}\n\nAssistant: {answer_2}\n\n[End of the conversation]")
_REF_CONV = ("[Reference conversation]\n\nUser: {question_1}\n\nReference answer: {ref_answer_1}\n\n"
             "User: {question_2}\n\nReference answer: {ref_answer_2}\n\n[End of the reference]\n\n")


def builtin_judge_prompts() -> dict[str, dict]:
    """pivotfuse's own single-answer judge prompts, keyed by role like `load_judge_prompts`."""
    def prompt(name: str, system: str, template: str) -> dict:
        return {"name": name, "type": "single", "system_prompt": system, "prompt_template": template,
                "output_format": "[[rating]]"}

    turn2 = "Focus on the assistant's reply to the second user question. Start with a short explanation. "
    return {
        "default": prompt("pivotfuse-single-v1", _OWN_SYSTEM,
                          "[Instruction]\n" + _GENERAL + "Start with a short explanation, be objective. " + _RATE
                          + "\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
                          "[The End of Assistant's Answer]"),
        "math": prompt("pivotfuse-single-ref-v1", _OWN_SYSTEM,
                       "[Instruction]\n" + _REFERENCE + "Be objective. " + _RATE
                       + "\n\n[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n"
                       "[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
                       "[The End of Assistant's Answer]"),
        "default-mt": prompt("pivotfuse-single-v1-multi-turn", _GENERAL + turn2 + _RATE + "\n\n", _CONV),
        "math-mt": prompt("pivotfuse-single-ref-v1-multi-turn", _REFERENCE + turn2 + _RATE + "\n\n",
                          _REF_CONV + _CONV),
    }
