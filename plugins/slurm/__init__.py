"""kasched's Slurm plugin (PrologSlurmctld / EpilogSlurmctld)."""
