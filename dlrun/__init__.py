"""dlrun: config-driven deep-learning experiments (Hydra configs, Lightning training, W&B tracking)."""

import time

__version__ = "0.1.0"

# When dlrun was first imported: summary.json's startup_seconds counts from here to the first training step.
IMPORTED_AT = time.time()
