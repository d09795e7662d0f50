"""The former name of jobs/eval.py (the `eval` stage), kept so that RayJobs, Helm values and
scripts that name it keep working: python jobs/evaluate.py -c CONFIG [--set k=v ...]"""

import _bootstrap  # noqa: F401  (puts the shipped lmforge source on sys.path)

from lmforge.stage import job_main

if __name__ == "__main__":
    job_main("eval")
