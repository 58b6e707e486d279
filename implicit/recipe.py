"""The implicit-fusion recipe: one YAML file with the target, the sources and every phase's settings.

Sections: `out`, `target` (the model trained: SFT, then DPO or WRPO), `sources` (each a local folder
or an `openai:MODEL[@URL]` endpoint, with optional per-source sampling settings), `data.prompts`,
and the phases `sample`, `score`, `pairs`, `sft`, `dpo`, `wrpo` (the dataclasses of
`implicit.config` and `implicit.pairs`). `load_implicit_recipe(..., check_paths=False)`
validates the schema only (a GPU recipe on a machine without its models).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import apply_overrides, field, from_dict, load_yaml
from core.errors import PivotfuseError
from evals.backends import parse_spec
from implicit.config import DPOTrainConfig, SampleConfig, ScoreConfig, SFTTrainConfig, WRPOTrainConfig, with_overrides
from implicit.pairs import PairConfig


@dataclass
class SourceSpec:
    """A source model and how it is sampled (unset fields: the `sample` section's)."""

    name: str = field(help="short name: its answers go to OUT/model_answer/NAME.jsonl")
    path: str = field(help="local HF folder, or openai:MODEL_ID[@BASE_URL] for an OpenAI-compatible server")
    chat_template: str | None = field(None, help="jinja file to use when the tokenizer has no chat template")
    temperature: float | None = field(None, help="sampling temperature for this source")
    top_p: float | None = field(None, help="top-p for this source")
    n: int | None = field(None, help="answers per prompt for this source")


@dataclass
class TargetSpec:
    """The target model: SFT-trained on the best answers, then preference-trained."""

    name: str = field(help="short name used in output folders")
    path: str = field(help="local HF folder")
    chat_template: str | None = field(None, help="jinja file to use when the tokenizer has no chat template")


@dataclass
class ImplicitData:
    prompts: str = field(help="prompts: FastChat question.jsonl (single-turn) or chats JSONL/datasets folder")


@dataclass
class ImplicitRecipe:
    """A whole implicit fusion: sample → score → build data → SFT → DPO / WRPO."""

    out: str = field(help="output folder of the run")
    target: TargetSpec = field(help="the model that is trained")
    sources: list[SourceSpec] = field(help="the source models whose answers are sampled")
    data: ImplicitData = field(help="the prompts")
    sample: SampleConfig = field(default_factory=SampleConfig, help="sampling of every source (and of the SFT model)")
    score: ScoreConfig = field(default_factory=lambda: ScoreConfig(scorer="verifier"),
                               help="the scorer of every answer")
    pairs: PairConfig = field(default_factory=PairConfig, help="SFT rows, DPO pairs and WRPO triples")
    sft: SFTTrainConfig = field(default_factory=SFTTrainConfig, help="SFT of the target on the best answers")
    dpo: DPOTrainConfig = field(default_factory=DPOTrainConfig, help="DPO of the SFT model (FuseChat-3.0)")
    wrpo: WRPOTrainConfig = field(default_factory=WRPOTrainConfig, help="WRPO of the SFT model")

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("sources: give at least one source model")
        names = [self.target.name] + [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: the name {dup[0]!r} is used twice (target and sources share OUT/model_answer)")
        for s in self.sources:  # each source's sampling settings must pass the sample section's checks
            overrides = {k: v for k, v in (("temperature", s.temperature), ("top_p", s.top_p), ("n", s.n))
                         if v is not None}
            if overrides:
                try:
                    with_overrides(self.sample, **overrides)
                except ValueError as e:
                    raise ValueError(f"sources: {s.name}: {e}") from None


def load_implicit_recipe(path: str | Path, overrides: list[str] | None = None,
                         check_paths: bool = True) -> ImplicitRecipe:
    """Load and validate an implicit-fusion recipe; `check_paths` also checks local folders and files."""
    data = apply_overrides(load_yaml(path), overrides or [], str(path))
    recipe = from_dict(ImplicitRecipe, data, src=str(path))
    if not check_paths:
        return recipe
    for spec in [recipe.target, *recipe.sources]:
        if not spec.path.startswith("openai:") and not Path(spec.path).is_dir():
            raise PivotfuseError(f"{path}: model {spec.name}: path {spec.path!r} is not a folder")
        if spec.chat_template and not Path(spec.chat_template).is_file():
            raise PivotfuseError(f"{path}: model {spec.name}: chat_template file {spec.chat_template!r} not found")
    if not Path(recipe.data.prompts).exists():
        raise PivotfuseError(f"{path}: 'data.prompts': {recipe.data.prompts!r} not found")
    if recipe.score.scorer == "reward_model":
        try:
            parse_spec(recipe.score.reward_model)
        except PivotfuseError as e:
            raise PivotfuseError(f"{path}: 'score.reward_model': {e}") from None
    return recipe
