"""Implicit fusion (FuseChat-3.0, WRPO): learn from the sources' sampled answers, not their logits.

No token alignment is needed, so any sources fuse, whatever their tokenizers. The phases, each a
plain function with explicit arguments:

    sample_answers(prompts, model, out, SampleConfig)              implicit.sample  N answers per prompt
    score_answers(prompts, out, models, ScoreConfig)               implicit.score   a reward per answer
    build_preference_data(prompts, out, scorer, sources, data_out,
                          PairConfig, target=None)                 implicit.pairs   SFT rows, DPO pairs, WRPO triples
    train_sft / train_dpo / train_wrpo(model, data, out, cfg)      implicit.train   TRL trainers

`load_prompts` (implicit.prompts) reads the prompts; `load_implicit_recipe` (implicit.recipe) a recipe.
"""
