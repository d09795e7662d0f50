"""A model project end to end: `lmforge init` writes one (scaffold.py), a pipeline runs its
stages in order and skips finished ones (pipeline.py), `lmforge plan` estimates a training
config's cost (plan.py), `lmforge quickstart` runs the built-in one (quickstart.py); the
commands are in command.py."""
