"""The LightningModule and what it is made of: tasks (loss + metrics), optimizers, schedulers, regularizers."""
