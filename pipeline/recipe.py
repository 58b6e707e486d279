"""The recipe: one YAML file that describes a whole fusion, loaded into typed sections.

Each section's dataclass lives with the package that uses it (`world.config`,
`fuse.train.config`, `merge.config`, `evals.config`); this module only composes them, resolves
`world:NAME` references and checks that files exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.config import apply_overrides, field, from_dict, load_yaml, to_dict
from core.errors import PivotfuseError
from core.loading import refuse_file_as_folder
from world.config import WORLD_DATA, WorldConfig
from merge.config import MergeSpec
from fuse.extract.config import ExtractConfig
from fuse.train.config import FuseConfig, FuseLLMConfig
from fuse.align.config import AlignConfig
from evals.config import AccuracyConfig, EvalConfig


CLM_NAME = "pivot-clm"  # the pivot-CLM baseline's name in outputs and tables
TARGET_PREFIX = "T_"  # target T_k of source NAME is called T_NAME, next to the source itself


@dataclass
class ModelSpec:
    """A chat model: a local Hugging Face folder, or `world:NAME` for a demo-world model."""

    name: str = field(help="short name used in output folders and tables")
    path: str = field(help="local HF folder, or world:NAME for a model of the demo world")
    chat_template: str | None = field(None, help="jinja file to use when the tokenizer has no chat template")
    domain: str | None = field(None, help="the held-out domain this source is the expert of (for the run's report)")


@dataclass
class ModelsConfig:
    pivot: ModelSpec = field(help="the pivot model P; targets are copies of it")
    sources: list[ModelSpec] = field(default_factory=list, help="source models S_1..S_K")

    def validate(self) -> None:
        names = [self.pivot.name] + [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"sources: duplicate model name {sorted(dup)[0]!r}")


@dataclass
class DataConfig:
    fusion: str = field(help="fusion corpus (JSONL/datasets folder, or world:fusion)")
    heldout: str | None = field(None, help="held-out chats for per-domain loss (or world:heldout)")


@dataclass
class WorldSpecRef:
    """A world built from a spec file (`world.spec`): real architectures, tokenizers and templates."""

    spec: str = field(help="the world spec (YAML): each model's config class and settings, tokenizer, template")
    out: str = field(".cache/spec-world", help="folder the world is built into (reused when its fingerprint matches)")


@dataclass
class Recipe:
    """A whole run: world (optional) → models → data → (later sections: extract, fuse, merge, eval)."""

    out: str = field(help="output folder of the run")
    models: ModelsConfig = field(help="pivot and sources")
    data: DataConfig = field(help="corpora")
    pivot_clm: bool = field(True, help="run: also train the pivot-CLM baseline (λ = 1, same data and steps)")
    world: WorldConfig | None = field(None, help="build the demo world first (models/data may say world:NAME)")
    merge: list[MergeSpec] = field(default_factory=list, help="parameter-space merges of the targets: each a name + method options")
    extract: ExtractConfig = field(default_factory=ExtractConfig, help="teacher extraction: top-k, batch size, max length, shards")
    eval: EvalConfig = field(default_factory=EvalConfig, help="evaluation: MT-Bench-style judging, held-out loss, report")
    accuracy: AccuracyConfig | None = field(None, help="exact-answer accuracy per domain of every model on a question "
                                                       "file with key answers (greedy)")
    fuse: FuseConfig = field(default_factory=FuseConfig, help="pairwise fusion: targets, loss, training of each T_k")
    align: AlignConfig = field(default_factory=AlignConfig, help="token/vocabulary alignment of each source onto the pivot")
    world_spec: WorldSpecRef | None = field(
        None, help="build a world from a spec file first ({spec, out}); `models` may then be left out: the "
                   "spec's pivot and sources, as world:NAME")
    fusellm: FuseLLMConfig | bool | None = field(
        None, help="FuseLLM mode: also train one target from the pivot and several sources at once "
                   "(true: every source, named fusellm; or {name, sources})")

    def __post_init__(self) -> None:
        # `fusellm: true` is the section with its defaults; `false` is no section
        if isinstance(self.fusellm, bool):
            self.fusellm = FuseLLMConfig() if self.fusellm else None

    def validate(self) -> None:
        if self.world is not None and self.world_spec is not None:
            raise ValueError("world_spec: a recipe has one world: the demo world (world) or a spec world (world_spec)")
        taken = {self.models.pivot.name, CLM_NAME, *(s.name for s in self.models.sources),
                 *(TARGET_PREFIX + s.name for s in self.models.sources)}
        if isinstance(self.fusellm, FuseLLMConfig):
            self.fusellm_sources()  # raises on a name that is not a source
            if self.fusellm.name in taken:
                raise ValueError(f"fusellm.name: {self.fusellm.name!r} is already a model or target name "
                                 "(models, targets and merges share one table)")
            taken.add(self.fusellm.name)
        for spec in self.merge:
            if spec.name in taken:
                raise ValueError(f"merge: name {spec.name!r} is used twice (models, targets and merges share one table)")
            taken.add(spec.name)

    def fusellm_sources(self) -> list[ModelSpec]:
        """The sources of the FuseLLM-mode target, in the order `fusellm.sources` names them (all
        of models.sources when it names none); at least two."""
        cfg = self.fusellm if isinstance(self.fusellm, FuseLLMConfig) else FuseLLMConfig()
        specs = {s.name: s for s in self.models.sources}
        for name in cfg.sources:
            if name not in specs:
                raise ValueError(f"fusellm.sources: {name!r} is not in models.sources ({', '.join(specs) or 'none'})")
        chosen = [specs[n] for n in cfg.sources] if cfg.sources else list(self.models.sources)
        if len(chosen) < 2:
            raise ValueError(f"fusellm.sources: FuseLLM mode needs at least two sources, the recipe has "
                             f"{len(chosen)} (one source is pairwise fusion: fuse --source NAME)")
        return chosen

    def world_path(self, ref: str) -> str:
        """Resolve `world:NAME` to the file or folder inside the world's build folder."""
        if not ref.startswith("world:"):
            return ref
        if self.world is None and self.world_spec is None:
            raise PivotfuseError(f"'{ref}' refers to the demo world but the recipe has no 'world' section")
        name = ref.split(":", 1)[1]
        base = Path(self.world.out if self.world is not None else self.world_spec.out)
        return str(base / "data" / f"{name}.jsonl") if name in WORLD_DATA else str(base / "models" / name)


def models_from_world_spec(raw: dict, src: str) -> dict:
    """A recipe with a `world_spec` section and no `models`: the spec's pivot and sources, as
    `world:NAME` with their domains, so adding a source to the spec adds it to the run."""
    ref = raw.get("world_spec")
    if "models" in raw or not isinstance(ref, dict) or not isinstance(ref.get("spec"), str):
        return raw  # the schema check names what is wrong with the section
    from world.spec import load_spec

    if not Path(ref["spec"]).is_file():
        raise PivotfuseError(f"{src}: 'world_spec.spec': file {ref['spec']!r} not found")
    spec = load_spec(ref["spec"])
    models = {"pivot": {"name": spec.pivot.name, "path": f"world:{spec.pivot.name}"},
              "sources": [{"name": m.name, "path": f"world:{m.name}", "domain": m.domain} for m in spec.sources]}
    return {**raw, "models": models}


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> Recipe:
    """Load and validate a recipe; relative paths are taken from the working directory.

    `check_paths=False` validates the schema only (e.g. a GPU recipe on a machine without its models).
    """
    data = models_from_world_spec(apply_overrides(load_yaml(path), overrides or [], str(path)), str(path))
    recipe = from_dict(Recipe, data, src=str(path))
    if not check_paths:
        return recipe
    for spec in [recipe.models.pivot, *recipe.models.sources]:
        if spec.path.startswith("world:"):
            recipe.world_path(spec.path)  # raises when there is no world section
        elif Path(spec.path).is_file():
            raise PivotfuseError(f"{path}: 'models' {spec.name}: path {spec.path!r} is a file, not a model folder")
        elif not Path(spec.path).is_dir():
            raise PivotfuseError(f"{path}: 'models' {spec.name}: path {spec.path!r} is not a folder")
        if spec.chat_template and not Path(spec.chat_template).is_file():
            raise PivotfuseError(f"{path}: 'models' {spec.name}: chat_template file {spec.chat_template!r} not found")
    for key in ("fusion", "heldout"):
        ref = getattr(recipe.data, key)
        if ref is None:
            continue
        if ref.startswith("world:"):
            recipe.world_path(ref)
        elif not Path(ref).exists():
            raise PivotfuseError(f"{path}: 'data.{key}': {ref!r} not found")
    if recipe.accuracy is not None:
        ref = recipe.accuracy.questions
        if ref.startswith("world:"):
            recipe.world_path(ref)
        elif not Path(ref).is_file():
            raise PivotfuseError(f"{path}: 'accuracy.questions': {ref!r} not found")
    return recipe


def recipe_for_fuse(path: str | None, overrides: list[str], *, pivot: str | None, source: str | None,
                    data: str | None, out: str | None, clm: bool, fuse_flags: dict,
                    sources: list[str] | None = None, fusellm: bool = False) -> Recipe:
    """The recipe of `pivotfuse fuse`: file `path` (+ `--set` overrides, keys in the whole recipe), or
    without one a recipe of the given folders, with --pivot/--source/--data/--out and the `fuse:`
    flags that were given (`fuse_flags`) on top. `sources` (--sources) or `fusellm` (--fusellm) ask
    for the FuseLLM-mode target: `sources` become its `fusellm.sources` (names in the recipe, else
    model folders)."""
    if sources is not None:
        _check_sources_flag(sources)
    if path:
        raw = models_from_world_spec(apply_overrides(load_yaml(path), overrides, str(path)), str(path))
        src = str(path)
    else:
        missing = [f"--{n}" for n, v in (("pivot", pivot), ("data", data), ("out", out)) if v is None]
        if fusellm and sources is None:
            missing.append("--sources")
        elif not clm and source is None and sources is None:
            missing.append("--source")
        if missing:
            raise PivotfuseError(f"fuse: without --recipe, {' '.join(missing)} required")
        raw = apply_overrides({}, overrides, "--set")
        src = "command line"
    models = raw.setdefault("models", {})
    if pivot:
        models["pivot"] = {"name": models.get("pivot", {}).get("name", "pivot"), "path": pivot}
    if source and not path:
        models["sources"] = [{"name": Path(source).name or "source", "path": source}]
    if sources is not None or fusellm:
        section = raw.get("fusellm")
        section = dict(section) if isinstance(section, dict) else {}
        if sources is not None and not path:  # model folders, named by their folder names
            names = [Path(s).name or f"source{i}" for i, s in enumerate(sources, 1)]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise PivotfuseError(f"fuse: --sources: two folders are named {dup[0]!r}; give them distinct names "
                                     "in a recipe")
            models["sources"] = [{"name": n, "path": s} for n, s in zip(names, sources)]
            section["sources"] = names
        elif sources is not None:
            known = [s.get("name") if isinstance(s, dict) else s for s in models.get("sources") or []]
            for name in sources:
                if name not in known:
                    raise PivotfuseError(f"fuse: --sources: {name!r} is not in the recipe's models.sources "
                                         f"({', '.join(map(str, known)) or 'none'})")
            section["sources"] = list(sources)
        raw["fusellm"] = section
    if data:
        raw.setdefault("data", {})["fusion"] = data
    if out:
        raw["out"] = out
    recipe = from_dict(Recipe, raw, src=src)
    recipe.fuse = from_dict(FuseConfig, {**to_dict(recipe.fuse), **fuse_flags}, src=src)
    for spec in [recipe.models.pivot, *recipe.models.sources]:
        if spec.path.startswith("world:"):
            continue
        refuse_file_as_folder(spec.path, f"{src}: model {spec.name}")
        if not Path(spec.path).is_dir():
            raise PivotfuseError(f"{src}: model {spec.name}: {spec.path!r} is not a folder")
    fusion = recipe.world_path(recipe.data.fusion)
    if not Path(fusion).exists():
        raise PivotfuseError(f"{src}: fusion corpus {fusion!r} not found")
    return recipe


def _check_sources_flag(sources: list[str]) -> None:
    """`fuse --sources`: at least two, each once."""
    if len(sources) < 2:
        raise PivotfuseError(f"fuse: --sources needs at least two sources, got {len(sources)} "
                             "(one source is pairwise fusion: --source NAME)")
    dup = sorted({s for s in sources if sources.count(s) > 1})
    if dup:
        raise PivotfuseError(f"fuse: --sources: {dup[0]!r} is given twice")
