"""Stage runs as a user inspects them after the fact: `lmforge runs compare` (runs.py)."""
