"""The former name of jobs/train.py (the `train` stage), kept so that RayJobs, Helm values and
scripts that name it keep working: python jobs/pretrain.py -c CONFIG [--set k=v ...]"""

import _bootstrap  # noqa: F401  (puts the shipped lmforge source on sys.path)

from lmforge.stage import job_main

if __name__ == "__main__":
    job_main("train")
