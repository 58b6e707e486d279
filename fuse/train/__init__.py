"""Training of a target T_k: the `fuse:` settings (`config`), the fusion loss over sparse top-k
targets (`loss`) and TRL's SFTTrainer with that loss (`trainer`)."""
