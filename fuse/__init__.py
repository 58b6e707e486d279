"""Phase 1 of FuseChat, pairwise knowledge fusion, grouped by step: `extract` (the teachers' top-k
distributions, stored), `align` (token and vocabulary alignment), `targets` (pairing, span
translation, fusion functions, training rows) and `train` (the fusion loss and trainer).

Library functions take explicit arguments (folders, stores, sections of the recipe), never a whole
recipe: `pipeline/` puts the steps together."""
