"""dlrun's launcher plugin for Hydra: each job of a sweep in its own process (see dlrun_launcher.py)."""
