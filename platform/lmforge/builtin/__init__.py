"""The built-in data every `builtin:` name in a config points at, torch-free and stdlib-only.

`corpus` (the `builtin:python-docs` pretraining corpus), `heldout` (which stdlib packages are
held out of it), `tasks` (the `builtin:stdlib-*` and `builtin:bias-pairs` eval items, built from
the held-out packages) and `sft` (the `builtin:stdlib-sft` chat data, from the rest). Data, eval
and finetune import from here; nothing here imports them, so the three agree on one split.
"""
