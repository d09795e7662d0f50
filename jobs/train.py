"""RayJob entry point of the `train` stage: python jobs/train.py -c CONFIG [--set k=v ...]"""

import _bootstrap  # noqa: F401  (puts the shipped lmforge source on sys.path)

from lmforge.stage import job_main

if __name__ == "__main__":
    job_main("train")
