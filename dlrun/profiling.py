"""`debug=profile`'s profiler: Lightning's PyTorchProfiler, reporting when its recording ends.

The preset (conf/debug/profile.yaml) records a few training steps (torch.profiler's wait/warmup/active
schedule). When they are recorded, this writes the Chrome/Perfetto trace `profile.pt.trace.json` to
`dirpath` (the run directory) and prints the table of top operators on the terminal and to dlrun.log.
It reports then, not at the end as Lightning's does: torch clears the events at the end of a recording.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pytorch_lightning.profilers import PyTorchProfiler

from dlrun.console import console

log = logging.getLogger("dlrun")
TRACE_FILE = "profile.pt.trace.json"


class ProfileReport(PyTorchProfiler):
    def __init__(self, dirpath: str, **kwargs: Any):
        super().__init__(dirpath=dirpath, on_trace_ready=self._report, **kwargs)

    def _report(self, profiler) -> None:
        if self._local_rank not in (None, 0):
            return
        trace = Path(self.dirpath) / TRACE_FILE
        profiler.export_chrome_trace(str(trace))
        table = profiler.key_averages().table(sort_by=self._sort_by_key, row_limit=self._row_limit)
        console.print(table, markup=False, highlight=False, soft_wrap=True)
        console.print(f"trace (https://ui.perfetto.dev, chrome://tracing): {trace}", soft_wrap=True)
        log.info("profile of the recorded steps:\n%s", table)
