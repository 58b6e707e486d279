"""Settings of `pivotfuse eval` (the recipe's `eval:` section and the command's flags)."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import field

# FastChat `llm_judge/common.py`: sampling temperature per MT-Bench category (0 = greedy),
# plus the demo set's categories (exact-answer skills greedy, small talk sampled).
FASTCHAT_TEMPERATURES: dict[str, float] = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1,
    "arith": 0.0, "facts": 0.0, "strings": 0.0, "chat": 0.7,
}
# Categories judged against a reference answer (FastChat's NEED_REF_CATS + the demo skills).
REFERENCE_CATEGORIES: tuple[str, ...] = ("math", "reasoning", "coding", "arith", "facts", "strings")


@dataclass
class EvalConfig:
    """MT-Bench-style answering/judging, held-out loss and the report.

    Model and judge specs: a local Hugging Face folder, or `openai:MODEL_ID[@BASE_URL]` for an
    OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp, `transformers serve`, OpenAI);
    prefix `NAME=` to choose the name used in file names and tables.
    """

    out: str = field("eval_out", help="output folder (model_answer/, model_judgment/, loss.json, report.md)")
    questions: str = field("demo", help="FastChat question.jsonl, or 'demo' for our own small set over the demo world's domains")
    judge_prompts: str | None = field(None, help="FastChat judge_prompts.jsonl; default: pivotfuse's own prompts with the same semantics")
    reference: str | None = field(None, help="reference answers (FastChat model_answer format: a .jsonl file, or a folder holding <judge>.jsonl)")
    judge: str | None = field(None, help="judge: local HF folder or openai:MODEL[@BASE_URL] (prefix NAME= to name it), "
                              "or 'reference': a deterministic check against reference answers (evals/reference_judge.py)")
    base_url: str | None = field(None, help="default base URL for openai: specs without @URL (else $OPENAI_BASE_URL, else https://api.openai.com/v1)")
    api_key_env: str = field("OPENAI_API_KEY", help="environment variable holding the endpoint's API key (unset = no key sent)")
    max_new_tokens: int = field(1024, help="answer length limit per turn (FastChat: 1024)")
    judge_max_tokens: int = field(2048, help="judgment length limit (FastChat: 2048)")
    system_prompt: str | None = field(None, help="system message put before each question (default: none, the model's template decides)")
    concurrency: int = field(4, help="parallel requests to an endpoint")
    retries: int = field(6, help="tries per endpoint request before giving up (connection errors, 429, 5xx)")
    backoff: float = field(2.0, help="first retry wait in seconds, doubled after each failed try (capped at 60)")
    timeout: float = field(600.0, help="seconds to wait for one endpoint response")
    batch_size: int = field(8, help="sequences per forward/generate call for local models")
    dtype: str = field("auto", help="dtype for local models", choices=("auto", "bfloat16", "float16", "float32"))
    device_map: str | None = field("auto", help="accelerate device_map for local models ('auto' = all visible GPUs, CPU when none)")
    seed: int = field(0, help="torch seed before each sampled generate call")
    data: str | None = field(None, help="held-out chats (JSONL / datasets folder with messages and domain) for `eval loss`")
    max_length: int = field(2048, help="tokens per held-out chat for `eval loss` (longer ones are cut; only the kept text is counted)")
    demo_facts: str | None = field(None, help="chats whose 'facts' rows give the demo set's facts questions (e.g. WORLD/data/heldout.jsonl)")

    def validate(self) -> None:
        for name in ("max_new_tokens", "judge_max_tokens", "concurrency", "retries", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.backoff < 0 or self.timeout <= 0:
            raise ValueError("backoff: must be >= 0 and timeout > 0")


@dataclass
class AccuracyConfig:
    """Exact-answer accuracy in `run` (the recipe's `accuracy:` section): every model answers a
    question file with key answers greedily (`evals.accuracy`); results under OUT/eval/accuracy."""

    questions: str = field(help="questions with one key answer per turn (JSONL with turns and answers), or "
                                "world:heldout_questions (world:valid_questions to choose settings)")
    batch_size: int = field(64, help="questions answered per generate call")
    max_new_tokens: int = field(96, help="reply length limit per turn (the demo world's answers: 96)")

    def validate(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
