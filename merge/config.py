"""Typed settings of a merge: the method and its options (`MergeConfig`), a named merge in a
recipe (`MergeSpec`), and a standalone merge job for `cli.py merge` / `--config merge.yaml`
(`MergeJob`). Torch-free, so `--help` and recipe loading stay fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.config import field
from merge.registry import METHODS

METHOD_NAMES = tuple(METHODS)  # `merge.registry`, the one list (torch-free: recipes load without torch)
DTYPES = ("float32", "bfloat16", "float16")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1048576' -> bytes (decimal units, GiB-style binary units)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size like '5GB' or '500MB': {text!r}")
    num, unit, suffix = float(m.group(1)), m.group(2).upper(), (m.group(3) or "").upper()
    base = 1024 if suffix == "IB" else 1000
    return int(num * base ** " KMGT".index(unit or " "))


@dataclass
class MergeConfig:
    """How to merge: the method and its options. Everything not used by a method is ignored,
    except `weights` with `varm`/`sce` (they compute their own weights), which is refused."""

    method: str = field("sce", help="merge method", choices=METHOD_NAMES)
    weights: list[float] | None = field(
        None, help="per-model weights in --models order (linear, task_arithmetic, ties, dare_*); default 1.0 each")
    select_topk: float = field(
        0.1, help="sce: fraction tau of elements kept by variance across task vectors (FuseChat-2.0 used 0.1)")
    sce_mask: str = field(
        "mergekit", choices=("mergekit", "fusechat"),
        help="sce: 'mergekit' zeroes unselected task-vector elements (mergekit 0.1.5 sce); "
             "'fusechat' lets the selection shape only the weights (the FuseChat-2.0 fork)")
    density: float = field(1.0, help="ties/dare_*: fraction of each task vector kept (mergekit default 1.0)")
    normalize: bool | None = field(
        None, help="divide by the sum of (kept) weights; default as mergekit: on for linear/ties, off otherwise")
    rescale: str = field(
        "inverse", choices=("inverse", "l1", "none"),
        help="dare_*: rescale kept elements by 1/density ('inverse', the DARE paper), to the original "
             "L1 norm ('l1', mergekit 0.1.5) or not at all")
    scale: float = field(1.0, help="multiply the merged task vector (mergekit's 'lambda'; not used by linear)")
    seed: int = field(0, help="dare_*: seed of the random drop masks (per tensor and model, so reruns match)")
    dtype: str | None = field(None, choices=DTYPES, help="output dtype of float tensors (default: the base's)")
    shard_size: str = field("5GB", help="largest output shard, e.g. 5GB or 500MB")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: must be one of {list(METHODS)}, got {self.method!r}")
        if not 0.0 < self.select_topk <= 1.0:
            raise ValueError(f"select_topk: must be in (0, 1], got {self.select_topk}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density: must be in (0, 1], got {self.density}")
        if self.weights is not None and METHODS[self.method].self_weighted:
            raise ValueError(f"weights: {self.method} computes its own per-tensor weights; remove 'weights'")
        if self.weights is not None and self.method == "linear" and sum(self.weights) == 0 \
                and self.normalize is not False:
            raise ValueError("weights: they sum to 0, so normalising divides by zero")
        try:
            if parse_size(self.shard_size) <= 0:
                raise ValueError("must be > 0")
        except ValueError as e:
            raise ValueError(f"shard_size: {e}") from None

    def resolved_normalize(self) -> bool:
        """`normalize`, or mergekit 0.1.5's per-method default when it is not set."""
        return self.normalize if self.normalize is not None else METHODS[self.method].normalize


@dataclass(kw_only=True)
class MergeSpec(MergeConfig):
    """One merge of a recipe's targets: a name (its output folder) and the method options."""

    name: str = field(help="name of the merged model (its output folder under the run's merged/)")

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name or ""):
            raise ValueError(f"name: use letters, digits, '.', '_' or '-', got {self.name!r}")
        super().validate()


@dataclass
class MergeJob(MergeConfig):
    """A standalone merge (`cli.py merge` flags or `--config merge.yaml`)."""

    base: str | None = field(None, help="base model folder (the pivot P): task vectors are model - base")
    models: list[str] = field(default_factory=list, help="model folders to merge (targets T_1..T_K)")
    out: str | None = field(None, help="output folder (written to a temporary name, renamed when complete)")
    overwrite: bool = field(False, help="replace an existing output folder")

    def validate(self) -> None:
        if not self.base:
            raise ValueError("base: required (--base DIR)")
        if not self.models:
            raise ValueError("models: at least one model is required (--models DIR ...)")
        if not self.out:
            raise ValueError("out: required (--out DIR)")
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(f"weights: {len(self.weights)} given for {len(self.models)} models")
        super().validate()

    def method_config(self) -> MergeConfig:
        """The method options alone (what `merge_models` takes)."""
        names = {f for f in MergeConfig.__dataclass_fields__}
        return MergeConfig(**{k: getattr(self, k) for k in names})
