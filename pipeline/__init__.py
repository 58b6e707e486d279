"""Orchestration: the only layer that puts the libraries (fuse, merge, evals, implicit, world)
together. `run` runs a whole recipe, `pairwise` phase 1 for one source, `fusellm` one target from
several sources at once (FuseLLM mode), `tasks` the single steps of the one-step commands; `recipe`
is the recipe itself, `steps` the run's ledger, `claims` its report (`fusellm_report` its FuseLLM parts)."""
