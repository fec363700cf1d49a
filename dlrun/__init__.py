"""dlrun: config-driven deep-learning experiments (Hydra configs, Lightning training, W&B tracking)."""

__version__ = "0.1.0"
