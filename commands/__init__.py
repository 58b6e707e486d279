"""One small adapter per command of `cli.py`: parse the flags and `--set`, load the one validated
section through `core.config.load_config` (or the whole recipe through `pipeline.recipe`), call the
orchestration in `pipeline/`, print. Each exposes `add_arguments(parser)` and `run(args)`.

Commands import `core`, `pipeline` and the torch-free section schemas (`*/config.py`, and
`fuse.align.build.AlignConfig`) they read their flags from; all work goes through `pipeline/`."""
