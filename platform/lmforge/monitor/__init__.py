"""Monitoring of served models: `lmforge monitor report` over the serving app's request log
and feedback store (serve/requestlog.py). stats.py computes,
report.py renders, command.py is the command line."""
