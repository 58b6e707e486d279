"""Chat backends for answering and judging: a local Hugging Face folder or an OpenAI-compatible
endpoint, behind one call: `chat(list of message lists, temperature, max_tokens) -> replies`.

Spec strings (CLI `--model`/`--judge`, recipe): `[NAME=]FOLDER` or `[NAME=]openai:MODEL[@BASE_URL]`.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import PivotfuseError
from core.files import brief, decode_utf8
from core.loading import chat_template as chat_template_for
from core.loading import load_causal_lm, load_tokenizer, refuse_file_as_folder
from evals.config import EvalConfig

DEFAULT_BASE_URL = "https://api.openai.com/v1"


@dataclass
class ModelRef:
    """A parsed spec: `kind` is 'local' (target = folder) or 'openai' (target = model id)."""

    name: str
    kind: str
    target: str
    base_url: str | None = None


def safe_name(text: str) -> str:
    """A file-name-safe model name (FastChat uses the model id as a file name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


# '@' followed by a scheme starts the endpoint; model ids may hold '@' themselves
# ("claude-3-5-sonnet@20240620", Cloudflare's "@cf/meta/llama-3-8b-instruct").
_AT_URL = re.compile(r"@(?=[A-Za-z][A-Za-z0-9+.-]*://)")
# '@' followed by what can only be a host (localhost, an IPv4 address, a name with a port, or a
# dotted name with a path) and no scheme: an endpoint missing its http(s)://, not part of an id.
_AT_HOST = re.compile(r"@(?=(?:localhost|\d{1,3}(?:\.\d{1,3}){3})(?::\d+)?(?:/|$)|[A-Za-z0-9.-]+:\d+(?:/|$)"
                      r"|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}/)")


def _checked_url(url: str, spec: str, origin: str) -> str:
    """`url` without a trailing '/' when the client can use it as an endpoint, else a one-line error.

    Only http(s) with a host is usable; anything else used to fall back to OpenAI's public
    endpoint, sending the API key and the prompts to a server the user never named.
    """
    what = f"{spec!r}: base URL {url!r}{origin}"
    try:
        if any(c.isspace() for c in url):
            raise ValueError("it contains white space")
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError as e:
        raise PivotfuseError(f"{what} is not a valid URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise PivotfuseError(f"{what} must start with http:// or https://")
    if not parts.hostname:
        raise PivotfuseError(f"{what} has no host (expected e.g. http://127.0.0.1:8000/v1)")
    if parts.username is not None or parts.password is not None:
        raise PivotfuseError(f"{what} holds credentials: pass the key in the variable named by api_key_env")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise PivotfuseError(f"{what} has a query or fragment: /chat/completions is appended to it")
    return url.rstrip("/")


def parse_spec(spec: str, default_base_url: str | None = None) -> ModelRef:
    """`[NAME=]FOLDER` or `[NAME=]openai:MODEL[@BASE_URL]` → ModelRef (folders must exist).

    The endpoint is `BASE_URL`, else `default_base_url` (a recipe's `eval.base_url`), else
    `$OPENAI_BASE_URL`, else OpenAI's; whichever it is must be a usable http(s) URL.
    """
    name = None
    m = re.match(r"^([A-Za-z0-9._-]+)=(.+)$", spec)
    if m:
        name, spec = m.group(1), m.group(2)
    if spec.startswith("openai:"):
        body = spec[len("openai:"):]
        at = _AT_URL.search(body) or _AT_HOST.search(body)
        model, url = (body[:at.start()], body[at.end():]) if at else (body, "")
        if not model or model.endswith("@"):
            raise PivotfuseError(f"{spec!r}: expected openai:MODEL_ID[@BASE_URL]")
        if url:
            url = _checked_url(url, spec, "")
        elif default_base_url:
            url = _checked_url(default_base_url, spec, " (the default base_url)")
        elif os.environ.get("OPENAI_BASE_URL"):
            url = _checked_url(os.environ["OPENAI_BASE_URL"], spec, " (from $OPENAI_BASE_URL)")
        else:
            url = DEFAULT_BASE_URL
        return ModelRef(name or safe_name(model.rsplit("/", 1)[-1]), "openai", model, url)
    path = Path(spec)
    refuse_file_as_folder(path, "model")
    if not path.is_dir():
        raise PivotfuseError(f"{spec!r}: not a model folder (or use openai:MODEL_ID[@BASE_URL] for an endpoint)")
    return ModelRef(name or safe_name(path.resolve().name), "local", str(path))


class LocalChatModel:
    """A local HF causal LM that answers with its own chat template (transformers `generate`)."""

    def __init__(self, ref: ModelRef, cfg: EvalConfig, chat_template: str | None = None) -> None:
        import torch

        self.name, self.cfg = ref.name, cfg
        self.tokenizer = load_tokenizer(ref.target, name=ref.name)
        self.template = chat_template_for(self.tokenizer, chat_template, f"{ref.name}: tokenizer at {ref.target}",
                                          "--chat-template NAME=FILE")
        device_map = cfg.device_map if torch.cuda.is_available() else None
        self.model = load_causal_lm(ref.target, dtype=cfg.dtype, device_map=device_map, name=ref.name)
        gen_eos = self.model.generation_config.eos_token_id
        ids = [self.tokenizer.eos_token_id] + (gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = sorted({i for i in ids if i is not None})
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        conf = self.model.config
        self.max_positions = getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None)
        self.truncated = 0  # prompts cut on the left to fit the context (counted, reported)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The generation prompt with the model's template; a template that refuses a system
        role gets the system text prepended to the first user turn instead."""
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja raises bare exceptions
            if messages and messages[0]["role"] == "system" and len(messages) > 1:
                merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
                return self.render(merged + messages[2:])
            raise PivotfuseError(f"{self.name}: chat template failed to render: {e}") from None

    def chat(self, batch: list[list[dict[str, str]]], temperature: float, max_tokens: int, *,
             top_p: float | None = None, seed: int | None = None) -> list[str]:
        """Replies to `batch`; sampled (with `top_p` when given) above temperature 1e-4, seeded
        with `seed` (default: the config's) before each generate call, so a batch replays exactly."""
        import torch

        prompts = [self.tokenizer(self.render(m), add_special_tokens=False)["input_ids"] for m in batch]
        out: list[str] = [""] * len(batch)
        order = sorted(range(len(batch)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
        bs = self.cfg.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            ids = [self._fit(prompts[i], max_tokens) for i in idx]
            width = max(len(x) for x in ids)
            new = max_tokens if not self.max_positions else max(1, min(max_tokens, self.max_positions - width))
            device = self.model.device
            input_ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)  # left pad
            sample = temperature > 1e-4  # FastChat: greedy below 1e-4
            kw: dict[str, Any] = {"do_sample": sample, "max_new_tokens": new, "pad_token_id": self.pad_id,
                                  "eos_token_id": self.eos_ids}
            if sample:
                kw["temperature"] = temperature
                if top_p is not None:
                    kw["top_p"] = top_p
                torch.manual_seed(self.cfg.seed if seed is None else seed)
            else:
                kw.update(temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                gen = self.model.generate(input_ids=input_ids, attention_mask=mask, **kw)
            for row, i in enumerate(idx):
                tokens = gen[row, width:].tolist()
                cut = next((t for t, tok in enumerate(tokens) if tok in self.eos_ids), len(tokens))
                out[i] = self.tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
        return out

    def _fit(self, ids: list[int], max_tokens: int) -> list[int]:
        """Keep the prompt's end (it holds the generation prompt) when prompt + reply overflow."""
        if not self.max_positions:
            return ids
        room = self.max_positions - min(max_tokens, 64)
        if len(ids) > room:
            self.truncated += 1
            return ids[len(ids) - room:]
        return ids

    def close(self) -> None:
        del self.model


_RETRY_HTTP = {408, 409, 429}


class OpenAIChatClient:
    """OpenAI-compatible `/chat/completions` client (stdlib only): bounded concurrency,
    retries with exponential back-off on connection errors, 408/409/429 and 5xx."""

    def __init__(self, ref: ModelRef, cfg: EvalConfig) -> None:
        self.name, self.model, self.cfg = ref.name, ref.target, cfg
        self.url = f"{ref.base_url}/chat/completions"
        self.key = os.environ.get(cfg.api_key_env) or None

    def chat(self, batch: list[list[dict[str, str]]], temperature: float, max_tokens: int, *,
             top_p: float | None = None, seed: int | None = None) -> list[str]:
        """Replies to `batch`, at most `concurrency` requests at a time. With `seed`, request i of
        the batch asks for seed + i: a server answers identical seeded requests identically, and
        a batch often repeats one prompt to sample it several times."""
        seeds = [None if seed is None else seed + i for i in range(len(batch))]
        if len(batch) == 1 or self.cfg.concurrency == 1:
            return [self.complete(m, temperature, max_tokens, top_p=top_p, seed=s) for m, s in zip(batch, seeds)]
        with ThreadPoolExecutor(min(self.cfg.concurrency, len(batch))) as pool:
            return list(pool.map(lambda ms: self.complete(ms[0], temperature, max_tokens, top_p=top_p, seed=ms[1]),
                                  zip(batch, seeds)))

    def complete(self, messages: list[dict[str, str]], temperature: float, max_tokens: int, *,
                 top_p: float | None = None, seed: int | None = None) -> str:
        request: dict[str, Any] = {"model": self.model, "messages": messages, "n": 1, "temperature": temperature,
                                   "max_tokens": max_tokens}
        if top_p is not None:  # sent only when asked for: servers differ in their defaults
            request["top_p"] = top_p
        if seed is not None:
            request["seed"] = seed
        body = json.dumps(request).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        last = ""
        for attempt in range(self.cfg.retries):
            if attempt:
                time.sleep(min(60.0, self.cfg.backoff * 2 ** (attempt - 1)))
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code in _RETRY_HTTP or e.code >= 500:
                    last = f"HTTP {e.code} {detail}"
                    continue
                raise PivotfuseError(f"{self.name}: {self.url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                    TimeoutError) as e:
                last = str(getattr(e, "reason", e))
                continue
            return self.reply_text(raw)
        raise PivotfuseError(f"{self.name}: no answer from {self.url} after {self.cfg.retries} tries ({last})")

    def reply_text(self, raw: bytes) -> str:
        """The reply in a `/chat/completions` response body; a body that is not UTF-8 JSON, or whose
        `choices[0].message.content` is not a string (null, a list of parts, a number), is refused
        in one line: an answer or a judgment is always text, never silently empty or a repr."""
        where = f"{self.name}: {self.url}"
        text = decode_utf8(raw, f"{where}: reply body", None)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PivotfuseError(f"{where} did not answer JSON ({e.msg}): {brief(text, 120)}") from None
        try:
            message = data["choices"][0]["message"]
            content = message["content"]
        except (KeyError, IndexError, TypeError):
            raise PivotfuseError(f"{where}: no choices[0].message.content in {str(data)[:200]}") from None
        if not isinstance(content, str):
            # what a server says when it sends no text (a refusal, a cut-off reasoning reply)
            refusal, finish = message.get("refusal"), data["choices"][0].get("finish_reason")
            why = ([f"refusal {brief(refusal)}"] if isinstance(refusal, str) else []) + \
                  ([f"finish_reason {finish!r}"] if isinstance(finish, str) else [])
            raise PivotfuseError(f"{where}: 'choices[0].message.content' must be a string, got {brief(content)}"
                                 + (f" ({', '.join(why)})" if why else ""))
        return content

    def close(self) -> None:
        pass


def load_backend(ref: ModelRef, cfg: EvalConfig, chat_template: str | None = None) -> Any:
    """The backend for a parsed spec (a local model is loaded now)."""
    if ref.kind == "openai":
        return OpenAIChatClient(ref, cfg)
    return LocalChatModel(ref, cfg, chat_template)
