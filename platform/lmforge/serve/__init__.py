"""Serving: a continuous-batching engine behind an OpenAI-compatible API on Ray Serve."""
