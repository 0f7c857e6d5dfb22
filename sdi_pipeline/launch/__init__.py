"""What a user runs: ``sdi-attribute`` (compose, check, launch), the jobs' command lines,
the launchers (local, SLURM, prepare), Hydra composition and ``sdi-status``."""

from sdi_pipeline.moved import moved_launcher_name as __getattr__  # noqa: F401  (old names)
