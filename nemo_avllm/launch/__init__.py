"""Cluster launch with NeMo-Run: recipes (plain functions returning a `run.Script` per training
stage), executors (Local = torchrun, Slurm = srun + pyxis container) and the `avllm launch` task.

Users without NeMo-Run use the plain sbatch scripts in `scripts/slurm/` (same entry point)."""
