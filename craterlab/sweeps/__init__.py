"""Sweeps past one machine: resume (``resume.py``), sharded extraction (``shards.py``), sweep
progress and summary (``progress.py``) and the budget planner (``plan.py``).

Launching is Hydra's job (``hydra/launcher=joblib|submitit_local|submitit_slurm``); these
modules only make the jobs safe to run in parallel, to interrupt and to relaunch.
"""
