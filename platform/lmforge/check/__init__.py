"""The `check` stage (stage.py): is a Ray cluster and its storage ready before a job spends?"""
