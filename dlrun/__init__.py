"""dlrun: config-driven deep-learning experiments (Hydra configs, Lightning training, W&B tracking)."""

import time
from pathlib import Path

__version__ = "0.1.0"

# When dlrun was first imported: summary.json's startup_seconds counts from here to the first training step.
IMPORTED_AT = time.time()

# The config groups: `conf/` at the top of a checkout (and of an editable install); a wheel installs the
# same files as the package `dlrun.conf` (pyproject.toml maps one onto the other).
_PACKAGE = Path(__file__).resolve().parent
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"
