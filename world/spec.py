"""A world described by a file: which models to build, each from a real transformers config class
at tiny width, a real tokenizer folder and a real chat template, trained on the demo corpus.

    seed: 0
    corpus: {n_source_train: 240, n_general: 240, n_fusion: 24, n_heldout: 12, system_share: 0.1}
    train: {steps: 80, batch_size: 8, lr: 5.0e-3}
    pivot:   {name: pivot, config: MistralConfig, settings: {...}, tokenizer: {folder: "assets:llama2", ...},
              chat_template: recipes/templates/openchat-3.5.jinja}
    sources:
      - {name: qwen3, config: Qwen3Config, settings: {...}, tokenizer: {folder: "assets:qwen3"},
         chat_template: tokenizer, domain: strings}

Adding a source is adding an entry under `sources`. `tokenizer.folder` is a folder with
`tokenizer.json` (relative to the working directory) or `assets:NAME` (a pinned asset,
`core.assets`); `chat_template` is `tokenizer` (the folder's own) or a jinja file. Every mistake is
one line naming the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import field, from_dict, load_yaml
from core.errors import PivotfuseError
from world.corpus import DOMAINS, SKILLS

OWN_TEMPLATE = "tokenizer"  # chat_template value: the tokenizer folder's own template
# Set from the tokenizer, never by hand: a model's vocabulary is its tokenizer's.
FROM_TOKENIZER = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class CorpusSpec:
    n_source_train: int = field(240, help="source-training conversations per skill domain")
    n_general: int = field(240, help="general chat conversations")
    n_fusion: int = field(24, help="fusion-corpus conversations per domain")
    n_heldout: int = field(12, help="held-out conversations per domain")
    n_valid: int = field(4, help="validation conversations per domain")
    system_share: float = field(0.1, help="share of the chats of every split that open with a system message "
                                          "(templates without a system role must cope with them)")
    system_prompt: str = field("You are a helpful assistant.", help="the system message's text")
    pivot_skill_share: float = field(0.1, help="share of each skill's chats the pivot also trains on")
    expert_chat_share: float = field(0.15, help="general chats an expert also trains on, per skill chat")

    def validate(self) -> None:
        for name in ("n_source_train", "n_general", "n_fusion", "n_heldout", "n_valid"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        for name in ("system_share", "pivot_skill_share", "expert_chat_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1]")


@dataclass
class TrainSpec:
    steps: int = field(80, help="optimizer steps of a model (each model scales it by its own `steps`)")
    batch_size: int = field(8, help="conversations per step")
    lr: float = field(5e-3, help="peak learning rate (each model scales it by its own `lr`)")
    max_length: int = field(160, help="tokens per training chat")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.lr <= 0:
            raise ValueError("lr: must be > 0")


@dataclass
class TokenizerSpec:
    folder: str = field(help="tokenizer folder (tokenizer.json), or assets:NAME for a pinned real tokenizer")
    add_special_tokens: list[str] = field(default_factory=list,
                                          help="special tokens the model adds to the vocabulary (OpenChat's "
                                               "<|end_of_turn|>)")
    eos_token: str | None = field(None, help="end-of-sequence token, when the model's differs from the folder's")
    pad_token: str | None = field(None, help="padding token (default: the folder's, else unk, else eos)")


@dataclass
class ModelEntry:
    name: str = field(help="model name (its folder WORLD/models/NAME, `world:NAME` in a recipe)")
    config: str = field(help="transformers config class, e.g. MixtralConfig, Gemma3TextConfig")
    tokenizer: TokenizerSpec = field(help="tokenizer folder and what the model changes in it")
    settings: dict[str, Any] = field(default_factory=dict, help="config settings (width, experts, sliding "
                                                                "window, tied embeddings, soft-capping...)")
    chat_template: str = field(OWN_TEMPLATE, help="'tokenizer' (the folder's own template) or a jinja file")
    domain: str | None = field(None, help="the skill this source is the expert of (arith, facts, strings, chat)")
    steps: float = field(1.0, help="its training steps, as a multiple of train.steps")
    lr: float = field(1.0, help="its learning rate, as a multiple of train.lr")

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name: {self.name!r} is not a folder name")
        if self.domain is not None and self.domain not in DOMAINS:
            raise ValueError(f"domain: {self.domain!r} is not one of {', '.join(DOMAINS)}")
        if self.steps <= 0 or self.lr <= 0:
            raise ValueError("steps: must be > 0" if self.steps <= 0 else "lr: must be > 0")


@dataclass
class WorldSpec:
    """A spec world: corpus and training settings, the pivot and its sources."""

    pivot: ModelEntry = field(help="the pivot (a generalist: chat plus a little of every skill)")
    sources: list[ModelEntry] = field(default_factory=list, help="source models, each the expert of a domain")
    seed: int = field(0, help="seed of the corpus and of every model")
    corpus: CorpusSpec = field(default_factory=CorpusSpec, help="corpus sizes (the demo world's generators)")
    train: TrainSpec = field(default_factory=TrainSpec, help="training of every model")

    @property
    def models(self) -> list[ModelEntry]:
        return [self.pivot, *self.sources]


def _where(i: int) -> str:
    return "pivot" if i == 0 else f"sources[{i - 1}]"


def tokenizer_folder(folder: str) -> Path:
    """`assets:NAME` → the pinned asset's folder (checked); else the folder as given."""
    if folder.startswith("assets:"):
        from core.assets import ASSETS, asset_dir

        name = folder.split(":", 1)[1]
        if f"tokenizers/{name}" not in {a.folder for a in ASSETS.values()}:
            raise PivotfuseError(f"unknown tokenizer asset {name!r}")
        return asset_dir(name)
    return Path(folder)


def _check_model(src: str, i: int, m: ModelEntry) -> None:
    import transformers
    from transformers import PretrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    key = f"'{_where(i)}"
    cls = getattr(transformers, m.config, None)
    if not (isinstance(cls, type) and issubclass(cls, PretrainedConfig)):
        raise PivotfuseError(f"{src}: {key}.config': {m.config!r} is not a transformers config class")
    if cls.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise PivotfuseError(f"{src}: {key}.config': {m.config} has no causal-LM model in transformers")
    defaults = cls()
    for name in m.settings:
        if name in FROM_TOKENIZER:
            raise PivotfuseError(f"{src}: {key}.settings.{name}': set from the tokenizer, not by hand")
        if not hasattr(defaults, name):
            raise PivotfuseError(f"{src}: {key}.settings.{name}': {m.config} has no setting {name!r}")
    try:
        folder = tokenizer_folder(m.tokenizer.folder)
    except PivotfuseError as e:
        raise PivotfuseError(f"{src}: {key}.tokenizer.folder': {e}") from None
    if not (folder / "tokenizer.json").is_file():
        raise PivotfuseError(f"{src}: {key}.tokenizer.folder': {folder} has no tokenizer.json")
    if m.chat_template == OWN_TEMPLATE:
        conf = folder / "tokenizer_config.json"
        own = (folder / "chat_template.jinja").is_file() or (
            conf.is_file() and json.loads(conf.read_text(encoding="utf-8")).get("chat_template"))
        if not own:
            raise PivotfuseError(f"{src}: {key}.chat_template': {folder} has no chat template of its own; "
                                 "name a jinja file")
    elif not Path(m.chat_template).is_file():
        raise PivotfuseError(f"{src}: {key}.chat_template': file {m.chat_template!r} not found")


def load_spec(path: str | Path) -> WorldSpec:
    """Read and check a world spec: schema, config classes and their settings, tokenizer folders,
    templates, unique names, one expert domain per source (the pivot has none)."""
    src = str(path)
    spec = from_dict(WorldSpec, load_yaml(path), src=src)
    if not spec.sources:
        raise PivotfuseError(f"{src}: 'sources': a world needs at least one source")
    seen: set[str] = set()
    for i, m in enumerate(spec.models):
        if m.name in seen:
            raise PivotfuseError(f"{src}: '{_where(i)}.name': {m.name!r} is used twice")
        seen.add(m.name)
        if i == 0 and m.domain is not None:
            raise PivotfuseError(f"{src}: 'pivot.domain': the pivot is a generalist (no domain)")
        if i > 0 and m.domain is None:
            raise PivotfuseError(f"{src}: '{_where(i)}.domain': a source needs the domain it is the expert of "
                                 f"({', '.join(DOMAINS)})")
        _check_model(src, i, m)
    return spec


def training_mix(entry: ModelEntry, splits: dict[str, list], corpus: CorpusSpec) -> list:
    """The chats a model trains on: an expert its skill plus some chat (a chat expert: the general
    chats); the pivot, a generalist, all the chat and a share of every skill."""
    if entry.domain == "chat":
        return list(splits["general"])
    if entry.domain in SKILLS:
        own = [c for c in splits["source_train"] if c.domain == entry.domain]
        return own + splits["general"][: max(int(len(own) * corpus.expert_chat_share), 1)]
    per_skill = int(corpus.n_source_train * corpus.pivot_skill_share)
    return list(splits["general"]) + [c for d in SKILLS for c in [c for c in splits["source_train"]
                                                                   if c.domain == d][:per_skill]]
