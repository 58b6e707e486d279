"""The recipe of an implicit-fusion run (`pivotfuse run` on a recipe with `target:` and `sources:`).

It is `implicit.recipe.ImplicitRecipe` plus what a whole run needs: an optional demo `world:`
(model and data paths may say `world:NAME`), held-out chats and key-answer questions for the
table, the SFT-gold baseline, and the folder of an explicit FuseChat merge to show beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from core.config import apply_overrides, field, from_dict, load_yaml
from core.errors import PivotfuseError
from evals.config import EvalConfig
from implicit.recipe import ImplicitRecipe
from world.config import WORLD_DATA, WorldConfig

GOLD_NAME = "sft-gold"  # the baseline: the target SFT-trained on the gold answers of the same prompts
SFT_NAME, DPO_NAME, WRPO_NAME = "sft-best", "dpo", "wrpo"


@dataclass
class RunData:
    """Prompts to sample and the data the table is measured on."""

    prompts: str = field(help="prompts: chats JSONL (the last reply is the gold answer) or world:fusion")
    per_domain: int | None = field(None, help="only the first N prompts of each domain (file order); unset = all")
    heldout: str | None = field(None, help="held-out chats for bits per byte (or world:heldout)")
    questions: str | None = field(None, help="questions with key answers for exact accuracy "
                                             "(or world:heldout_questions)")

    def __post_init__(self) -> None:
        if self.per_domain is not None and self.per_domain <= 0:
            raise ValueError(f"per_domain: must be > 0, got {self.per_domain}")


@dataclass
class ImplicitRunRecipe(ImplicitRecipe):
    """A whole implicit fusion run: sample → score → build → SFT / SFT-gold → DPO, WRPO → table."""

    data: RunData = field(help="prompts and evaluation data")
    world: WorldConfig | None = field(None, help="build the demo world first (paths may say world:NAME)")
    gold_baseline: bool = field(True, help="also SFT-train the target on the gold answers (same prompts, steps, "
                                           "optimiser): the honest baseline")
    explicit: str | None = field(None, help="folder of an explicit FuseChat merge to put in the table "
                                            "(e.g. runs/demo/merged/sce-fusechat); absent = the row says so")
    explicit_name: str = field("explicit-fusechat", help="the explicit merge's name in the table")
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(max_new_tokens=64, max_length=256),
                             help="greedy answering and held-out loss settings (batch_size, max_new_tokens, ...)")

    def __post_init__(self) -> None:
        super().__post_init__()
        taken = [self.target.name, *(s.name for s in self.sources)]
        for name in (GOLD_NAME, SFT_NAME, DPO_NAME, WRPO_NAME, self.explicit_name):
            if name in taken:
                raise ValueError(f"sources: the name {name!r} is one of the run's own models; rename it")

    def path(self, ref: str) -> str:
        """Resolve `world:NAME` to the world's data file or model folder."""
        if not ref.startswith("world:"):
            return ref
        if self.world is None:
            raise PivotfuseError(f"'{ref}' refers to the demo world but the recipe has no 'world' section")
        name = ref.split(":", 1)[1]
        base = Path(self.world.out)
        return str(base / "data" / f"{name}.jsonl") if name in WORLD_DATA else str(base / "models" / name)


def is_implicit_recipe(path: str | Path) -> bool:
    """An implicit-fusion recipe names a `target` and top-level `sources` (an explicit one has `models`)."""
    data = load_yaml(path)
    return isinstance(data, dict) and "target" in data and "models" not in data


def load_run_recipe(path: str | Path, overrides: list[str] | None = None) -> ImplicitRunRecipe:
    """Load and validate the recipe (schema only: world paths exist once the world is built)."""
    data = apply_overrides(load_yaml(path), overrides or [], str(path))
    recipe = from_dict(ImplicitRunRecipe, data, src=str(path))
    for spec in [recipe.target, *recipe.sources]:
        if spec.path.startswith("openai:"):
            continue
        recipe.path(spec.path)  # a world: path without a world section is an error now
    refs = {k: getattr(recipe.data, k) for k in ("prompts", "heldout", "questions")}
    for ref in refs.values():
        if ref is not None:
            recipe.path(ref)
    if recipe.data.prompts in (recipe.data.heldout, recipe.data.questions) or (
            recipe.data.prompts.startswith("world:") and "heldout" in recipe.data.prompts):
        raise PivotfuseError(f"{path}: 'data.prompts': {recipe.data.prompts!r} is the data the table is measured "
                             "on; sample the fusion split (world:fusion)")
    return recipe


def check_paths(recipe: ImplicitRunRecipe, src: str) -> None:
    """Every local model folder and data file exists (after the world is built)."""
    for spec in [recipe.target, *recipe.sources]:
        if spec.path.startswith("openai:"):
            continue
        folder = Path(recipe.path(spec.path))
        if not folder.is_dir():
            raise PivotfuseError(f"{src}: model {spec.name}: path {str(folder)!r} is not a folder")
        if spec.chat_template and not Path(spec.chat_template).is_file():
            raise PivotfuseError(f"{src}: model {spec.name}: chat_template file {spec.chat_template!r} not found")
    for key in ("prompts", "heldout", "questions"):
        ref = getattr(recipe.data, key)
        if ref is not None and not Path(recipe.path(ref)).exists():
            raise PivotfuseError(f"{src}: 'data.{key}': {recipe.path(ref)!r} not found")


def settings_of(recipe: ImplicitRunRecipe, section: str) -> dict:
    """One section as a plain dict (for fingerprints)."""
    return dataclasses.asdict(getattr(recipe, section))
