"""Launchers: submitit jobs (`python -m jobs.train`, `python -m jobs.predict`) and the helpers that the
sbatch scripts in `slurm/` call (`python -m jobs.common`). They call the same functions and console
script a user does; what they add is launching, requeue and environment."""
