"""The merge methods, declared once: the options each reads, whether it takes per-model weights, and
mergekit 0.1.5's default for `normalize`. Torch-free, so config validation and `--help` read it
without loading torch.

`merge.methods` binds each name to its kernel with `@register(name)`, and checks that the kernel's
keyword-only parameters are exactly the options declared here (the signature is the method's
declaration, mergekit style). Config validation (`merge.config`), the kernels' calls
(`merge.methods`) and the model card (`merge.card`) all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    options: tuple[str, ...]  # `MergeConfig` fields the method reads, as its kernel's keyword-only parameters
    normalize: bool = False  # mergekit 0.1.5's default of `normalize` for this method
    task_vectors: bool = True  # merges τ_k = θ_k − base (False: the models' own values θ_k)

    @property
    def self_weighted(self) -> bool:
        """Derives its own per-tensor weights (then user weights would be ignored, so they are refused)."""
        return "weights" not in self.options


_TASK_ARITHMETIC = ("weights", "normalize", "scale")
_DARE = ("weights", "density", "rescale", "normalize", "scale", "seed")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("varm", ()),
    Method("sce", ("select_topk", "sce_mask")),
    Method("linear", ("weights", "normalize"), normalize=True, task_vectors=False),
    Method("task_arithmetic", _TASK_ARITHMETIC),
    Method("ties", ("weights", "density", "normalize", "scale"), normalize=True),
    Method("dare_ties", _DARE),
    Method("dare_linear", _DARE),
)}
