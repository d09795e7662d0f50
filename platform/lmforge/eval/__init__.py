"""Evaluation: language-modelling metrics, multiple-choice / generation / classification tasks,
bias probes, reports and the regression gate (see docs/evaluation.md)."""
