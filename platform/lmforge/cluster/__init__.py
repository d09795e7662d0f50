"""Ray clusters: a local head and connecting drivers (local.py), submitting a stage as a Ray
job (submit.py), and their commands (command.py)."""
