"""Orchestration: the only layer that puts the libraries (fuse, merge, evals, implicit, world)
together. `run` runs a whole recipe, `pairwise` phase 1 for one source, `tasks` the single steps of
the one-step commands; `recipe` is the recipe itself, `steps` the run's ledger, `claims` its report."""
