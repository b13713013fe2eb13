"""The chain of periods and its command line: which periods remain and how they run here
(periods.py), SLURM jobs (slurm.py), reports, recommendations and exports, the demo, and the
shipped files (files.py)."""
