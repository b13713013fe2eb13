"""The chain of periods: plan, state, resume, hostfiles, SLURM glue and the demo."""
