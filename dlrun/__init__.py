"""dlrun: config-driven deep-learning experiments (Hydra configs, Lightning training, W&B tracking)."""

import time
from pathlib import Path

__version__ = "0.1.0"

# When dlrun was first imported (a job forked by a sweep's fork server: when it was forked): summary.json's
# startup_seconds counts from here to the first training step.
IMPORTED_AT = time.time()

# The config groups: `conf/` at the top of a checkout, which dlrun/conf links to; a wheel installs the files
# themselves as the package `dlrun.conf`.
CONF_DIR = Path(__file__).resolve().parent / "conf"
