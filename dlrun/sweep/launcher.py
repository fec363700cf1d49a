"""Run a sweep's jobs as separate processes, a few at a time, and record how each one ended.

A job is a plain single `dlrun` run (`python -m dlrun.cli <overrides> hydra.run.dir=<job dir>`) in a
new process session: its imports, CUDA context, W&B run, DDP children, crash or out-of-memory kill
belong to it alone, and Lightning's DDP re-launch (which re-runs `sys.argv`) sees an ordinary run.
Whatever happens to the process, its job directory ends with a `summary.json`: the job's own, or
one this module writes with `status: failed` and the last lines of the job's output.

Given a warm fork server (dlrun/sweep/fork_server.py), a job that runs on the CPU in one process is
forked from it instead of started as a fresh Python, which skips the seconds of imports; it is a
process of its own all the same, in a new session, with the same command line, environment and log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from dlrun.curves import write_curves
from dlrun.run_summary import RunSummary
from dlrun.rundir import RunDir, RunInterrupted
from dlrun.sweep.fork_server import ForkedJob, ForkServer

JOB_LOG = "job.log"  # the job process's stdout and stderr
ERROR_LINES = 15  # lines of output kept as the error of a job that could not write its own summary
_POLL_SECONDS = 0.2
_BOX = "╭╮╰╯│─┃━┏┓┗┛"
_KILL_GRACE_SECONDS = 10.0

# Sweep directories launched by this process, for the report at the end of `dlrun -m` (see end_of_sweeps).
launched_sweeps: list[Path] = []


@dataclass
class Job:
    """One job of a sweep: its number, overrides and directory, and how to run it.

    `command` is None when the job's config could not even be composed; `error` then says why, and
    the job is recorded as failed without starting a process.
    """

    num: int
    overrides: list[str]
    job_dir: Path
    command: list[str] | None
    error: str | None = None
    monitor: str | None = None  # what the job would optimize, for its summary if it cannot write one
    mode: str | None = None
    continues: bool = False  # `command` continues an earlier attempt in `job_dir` (resume): its log goes on
    forkable: bool = False  # a `python -m dlrun.cli` run in one process on the CPU: a fork server may start it


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen | ForkedJob
    log: IO[str]
    gpu: str | None
    started: float
    started_at: str
    stopping_since: float | None = None
    timed_out: bool = False
    pruned: dict[str, Any] | None = None  # {epoch, value}: the sweeper's pruner stopped it


def visible_gpus(gpus: Sequence[int | str] | None) -> list[str]:
    """GPU ids to hand out: the configured ones, else CUDA_VISIBLE_DEVICES, else what nvidia-smi lists.

    Asking nvidia-smi rather than torch keeps torch (seconds of imports) out of the sweep process.
    """
    if gpus is not None:
        return [str(g) for g in gpus]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def run_jobs(
    jobs: Iterable[Job],
    n_jobs: int = 1,
    gpus: Sequence[str] = (),
    jobs_per_gpu: int = 1,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    on_done: Callable[[Job, RunSummary], None] | None = None,
    prune: Callable[[Job], dict[str, Any] | None] | None = None,
    fork_server: ForkServer | None = None,
) -> dict[int, RunSummary]:
    """Run `jobs`, at most `n_jobs` at once, and return {job number: its final summary}.

    `jobs` is read one job at a time, when a slot frees: an Optuna sweeper hands out each trial only then.
    With GPUs, each job sees one of them (CUDA_VISIBLE_DEVICES), handed out round robin to at most
    `jobs_per_gpu` jobs each. A job running longer than `timeout` seconds is stopped. `prune`, asked at
    every poll about each running job, stops it like a timeout (SIGTERM: it keeps its last checkpoint)
    when it returns {epoch, value}, and the job is recorded as `pruned`. On an interrupt (Ctrl-C, or
    SIGTERM within `sigterm_interrupts`) every running job is stopped before the interrupt goes on,
    cleanly if it stops within the grace period (see _stop_all). Forkable jobs without a GPU are forked
    from `fork_server` (the first one waits until it is warm), the others start as new processes.
    """
    slots = min(n_jobs, len(gpus) * jobs_per_gpu) if gpus else n_jobs
    load = dict.fromkeys(gpus, 0)
    waiting = iter(jobs)
    exhausted = False
    running: list[_Running] = []
    results: dict[int, RunSummary] = {}
    next_gpu = 0

    def finish(job: Job, summary: RunSummary) -> None:
        results[job.num] = summary
        if on_done is not None:
            on_done(job, summary)

    try:
        while not exhausted or running:
            while not exhausted and len(running) < slots:
                job = next(waiting, None)
                if job is None:
                    exhausted = True
                    break
                if job.command is None:
                    finish(job, _record_failure(job, job.error or "the job could not be composed", None, None))
                    continue
                gpu = None
                if gpus:  # round robin over the GPUs with a free place
                    order = [gpus[(next_gpu + i) % len(gpus)] for i in range(len(gpus))]
                    gpu = next(g for g in order if load[g] < jobs_per_gpu)
                    load[gpu] += 1
                    next_gpu = (gpus.index(gpu) + 1) % len(gpus)
                running.append(_start(job, gpu, env, fork_server))
            time.sleep(_POLL_SECONDS)
            for run in list(running):
                if run.process.poll() is None:
                    _enforce_timeout(run, timeout)
                    if prune is not None and run.stopping_since is None:
                        run.pruned = prune(run.job)
                        if run.pruned is not None:
                            _ask_to_stop(run)
                    continue
                running.remove(run)
                if run.gpu is not None:
                    load[run.gpu] -= 1
                finish(run.job, _collect(run))
    finally:
        _stop_all(running)  # only on an interrupt or an error of our own
    return results


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM to the sweep process stops it as Ctrl-C does (a RunInterrupted, which the CLI reports), so
    that run_jobs stops its running jobs cleanly instead of leaving them running on their own."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise RunInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_all(running: list[_Running]) -> None:
    """Stop the running jobs as a signal stops a single run: SIGTERM, on which each saves its last checkpoint
    and writes an `interrupted` summary (a resumed sweep continues from there); SIGKILL after the grace."""
    for run in running:
        _stop(run, force=False)
    deadline = time.time() + _KILL_GRACE_SECONDS
    try:
        while time.time() < deadline and any(run.process.poll() is None for run in running):
            time.sleep(_POLL_SECONDS)
    finally:  # also on a second Ctrl-C: nothing is left running
        for run in running:
            if run.process.poll() is None:
                _stop(run, force=True)
            run.log.close()


def _start(job: Job, gpu: str | None, env: dict[str, str] | None, fork_server: ForkServer | None) -> _Running:
    job.job_dir.mkdir(parents=True, exist_ok=True)
    job_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        job_env["CUDA_VISIBLE_DEVICES"] = gpu
    log = open(job.job_dir / JOB_LOG, "a" if job.continues else "w")  # noqa: SIM115 (closed when the job ends)
    assert job.command is not None
    process: subprocess.Popen | ForkedJob | None = None
    if fork_server is not None and job.forkable and gpu is None and fork_server.ready(wait=True):
        with contextlib.suppress(OSError):  # the server has stopped: this job and the next ones start fresh
            process = fork_server.start(job.command[3:], job_env, job.job_dir / JOB_LOG)  # after -m dlrun.cli
    if process is None:
        process = subprocess.Popen(
            job.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=job_env,
            start_new_session=True,  # its own process group: a timeout stops the job and its DDP children
        )
    return _Running(job, process, log, gpu, time.time(), _now())


def _enforce_timeout(run: _Running, timeout: float | None) -> None:
    """Stop a job past its time; kill one that was asked to stop (timed out, pruned) and has not, after a grace."""
    if run.stopping_since is None and timeout is not None and time.time() - run.started > timeout:
        run.timed_out = True
        _ask_to_stop(run)
    elif run.stopping_since is not None and time.time() - run.stopping_since > _KILL_GRACE_SECONDS:
        _stop(run, force=True)


def _ask_to_stop(run: _Running) -> None:
    """SIGTERM a job (timed out, pruned): it saves its last checkpoint and stops, or _enforce_timeout kills it
    after the grace period counted from now."""
    run.stopping_since = time.time()
    _stop(run, force=False)


def _stop(run: _Running, force: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.process.pid, signal.SIGKILL if force else signal.SIGTERM)
    if force:
        run.process.wait()


def _collect(run: _Running) -> RunSummary:
    """The job's final summary: its own if it wrote one and exited cleanly, else a failure record."""
    run.log.close()
    job, code = run.job, run.process.returncode
    process = {
        "num": job.num,
        "command": job.command,
        "returncode": code,
        "gpu": run.gpu,
        "forked": isinstance(run.process, ForkedJob),  # from the fork server, else a new process
        "log": JOB_LOG,
        "process_started_at": run.started_at,
        "process_finished_at": _now(),
        "process_seconds": round(time.time() - run.started, 3),
    }
    summary = RunDir(job.job_dir).read_summary_if_any()
    if run.pruned is not None and not (summary is not None and summary.status == "completed"):
        return _record_pruned(job, run.pruned, process, summary)
    if summary is not None and code == 0:
        summary.sweep_job = process
        RunDir(job.job_dir).write_summary(summary)
        return summary
    tail = _tail(job.job_dir / JOB_LOG)
    if run.timed_out:
        reason = f"timed out: stopped after {process['process_seconds']:.0f} s (hydra.launcher.timeout)"
    elif code < 0:
        reason = f"killed by signal {signal.Signals(-code).name}" + (" (out of memory?)" if code == -9 else "")
    else:
        reason = f"exited with code {code}"
    return _record_failure(job, f"{reason}\n{tail}".strip(), process, summary)


def _record_failure(job: Job, error: str, process: dict[str, Any] | None, summary: RunSummary | None) -> RunSummary:
    """Write (or complete) the summary.json of a job that failed, and return it."""
    record = _launcher_record(job, process, summary)
    record.status = "failed"
    record.error = record.error + "\n" + error if record.error else error
    RunDir(job.job_dir).write_summary(record)
    return record


def _record_pruned(job: Job, pruned: dict[str, Any], process: dict[str, Any], summary: RunSummary | None) -> RunSummary:
    """Write the summary.json of a job its sweeper's pruner stopped (the job itself wrote `interrupted`), and
    redraw its curves.png, which marks the epoch it stopped at."""
    record = _launcher_record(job, process, summary)
    record.status, record.pruned = "pruned", pruned
    RunDir(job.job_dir).write_summary(record)
    if (job.job_dir / "metrics.csv").is_file():
        write_curves(job.job_dir, record.to_json())
    return record


def _launcher_record(job: Job, process: dict[str, Any] | None, summary: RunSummary | None) -> RunSummary:
    """The job's summary as far as the launcher knows it, for a job that did not end on its own terms."""
    now = _now()
    # what the job itself wrote before it stopped wins over the launcher's guesses
    record = summary or RunSummary(monitor=job.monitor, mode=job.mode, overrides=job.overrides)
    record.run_dir = record.run_dir or str(job.job_dir)
    record.started_at = record.started_at or (process["process_started_at"] if process else now)
    record.finished_at = record.finished_at or (process["process_finished_at"] if process else now)
    if record.wall_seconds is None:
        record.wall_seconds = process["process_seconds"] if process else 0.0
    if process is not None:
        record.sweep_job = process
    return record


def _tail(path: Path, lines: int = ERROR_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # rich panels (dlrun's error messages) draw boxes: keep their words, not their borders
    kept = [line.strip(_BOX + " \t") for line in text.splitlines()]
    return "\n".join([line for line in kept if line][-lines:])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
