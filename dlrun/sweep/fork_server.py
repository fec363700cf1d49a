"""A warm process that forks a sweep's jobs: each job still a process of its own, without Python's start-up.

A fresh `python -m dlrun.cli` spends seconds importing torch, Lightning and Hydra before its first step,
often longer than a small job trains. The launcher therefore starts this server once per sweep
(`python -m dlrun.sweep.fork_server`); it imports what every job imports, once, and then forks one child
per job. The child becomes what a fresh job process would be: a new session (its own process group,
which a timeout or an interrupt signals as a whole), the job's working directory, environment, argv,
and stdin/stdout/stderr (/dev/null and the job's log); then it runs dlrun.cli as `__main__` and ends
as the interpreter's exit ends it (threads joined, atexit handlers run, output flushed, the exit code
its own), without the module teardown (seconds with torch loaded; see _run_job).
The server reaps its children and reports each exit status to the launcher.

Why forking is safe here: the server runs no job code and starts nothing. After its imports it checks
that it is the only thread (fork copies only the calling thread: a lock held by another would stay
locked forever in the child) and that CUDA is not initialized (a CUDA context does not survive fork);
otherwise it refuses, and the launcher starts every job as a fresh process. The launcher also starts
fresh any job given a GPU and any DDP job (Lightning starts its ranks by re-running the command line),
and does not use the server at all on a machine with GPUs or without fork (see dlrun/sweep/launcher.py).
What a child inherits beyond a fresh process's state is the imported modules; the random generators
are seeded by the job itself (seed_everything), as in a fresh process.

Protocol: JSON lines. The server says {"ready": bool, "reason": str}; the launcher sends one request per
job ({"argv", "cwd", "env", "log", "module"}, and "stderr" when it goes to a file of its own); the server answers {"started": pid} at once and {"exited": pid,
"returncode": code} when the child ends (code as subprocess's: negative for a signal).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import pkgutil
import runpy
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_WAIT_SECONDS = 0.05  # how often the server reaps its children while no request comes


# --- the server ---------------------------------------------------------------------------------------


def _warm_up() -> str:
    """Import what a job imports; '' when forking is safe afterwards, else why not."""
    import matplotlib.backends.backend_agg  # noqa: F401  (curves.png)
    from hydra.core.plugins import Plugins

    import dlrun.cli  # noqa: F401  (Hydra, dlrun's config checks)
    import dlrun.data
    import dlrun.models
    import dlrun.run  # noqa: F401  (torch, Lightning, the training code)

    Plugins.instance()  # Hydra's plugin discovery imports every hydra_plugins module; a child finds it done

    for package in (dlrun.models, dlrun.data):  # the option modules that jobs instantiate by name
        for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            with contextlib.suppress(ImportError):  # an option whose extra is not installed: its job fails alone
                importlib.import_module(module.name)
    import torch

    if threading.active_count() != 1:
        return f"the imports started threads ({', '.join(t.name for t in threading.enumerate())})"
    if torch.cuda.is_initialized():
        return "the imports initialized CUDA"
    return ""


def _send(message: dict[str, Any]) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())  # unbuffered: a forked child inherits no pending output


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send({"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})


def serve() -> dict[str, Any] | None:
    """Serve jobs until stdin closes (then None); in each forked child, return that child's request."""
    reason = _warm_up()
    _send({"ready": not reason, "reason": reason})
    if reason:
        return None
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], _WAIT_SECONDS)
        if readable:
            chunk = os.read(0, 1 << 16)
            if not chunk:  # the launcher is gone or done; running children (own sessions) live on
                return None
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                in_session, signal_it = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.setsid()  # before the launcher learns the pid: it signals the job's process group
                    os.close(signal_it)
                    os.close(in_session)
                    return request
                os.close(signal_it)
                os.read(in_session, 1)  # returns once the child has closed its end, after setsid
                os.close(in_session)
                _send({"started": pid})
        _reap()


def _become(request: dict[str, Any]) -> None:
    """Turn this forked child (already in a session of its own, see serve) into the job's process."""
    import dlrun

    started_in = os.getcwd()
    os.chdir(request["cwd"])
    if sys.path and sys.path[0] == started_in:  # `python -m` puts the directory it starts in first on the path
        sys.path[0] = os.getcwd()
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, request["log"]), (2, request.get("stderr", request["log"]))):
        log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.dup2(log, fd)
        os.close(log)
    sys.argv = [sys.argv[0], *request["argv"]]  # run_module puts the module's file first
    dlrun.IMPORTED_AT = time.time()  # summary.json's startup_seconds counts from here


def _run_job(module: str) -> int:
    """Run the module (dlrun.cli for a sweep's job) as `__main__` and end as the interpreter ends, short of
    tearing its modules down (seconds with torch loaded, and nothing a job needs): threads joined, atexit
    handlers run, output flushed. This is how multiprocessing's forked children end too. Returns the exit
    code Python would have exited with."""
    sys.modules.pop(module, None)  # as in a fresh process, where only __main__ runs it (runpy warns otherwise)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:  # sys.exit("message")
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # waits for non-daemon threads, as the interpreter does at exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def main() -> None:
    request = serve()
    if request is None:
        return
    _become(request)
    os._exit(_run_job(request["module"]))


# --- the launcher's side ------------------------------------------------------------------------------


class ForkServer:
    """The launcher's handle on a server process: start it, ask it for jobs, learn how they ended."""

    def __init__(self, env: dict[str, str], stderr: Path):
        with open(stderr, "a") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "dlrun.sweep.fork_server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, env=env, start_new_session=True,  # Ctrl-C in the terminal is the launcher's to handle
            )
        self._pending = b""
        self._warm = False
        self._started: list[int] = []
        self.exited: dict[int, int] = {}  # pid -> return code, as reported
        self.reason: str | None = None  # why it does not serve (None: it does, or may once warm)

    def ready(self, wait: bool = False) -> bool:
        """Whether it serves jobs now; with `wait`, after it has finished warming up (or given up)."""
        self._read(block=False)
        while wait and not self._warm and self.reason is None:
            self._read(block=True)
        return self._warm and self.reason is None

    def start(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None,
              stderr: Path | None = None, module: str = "dlrun.cli") -> ForkedJob:
        """Fork a job that runs `python -m MODULE *argv` with `env` in `cwd` (default: this one), its output
        appended to `log` (its stderr to `stderr` when given)."""
        assert self._process.stdin is not None
        request = {"argv": argv, "cwd": str(cwd or os.getcwd()), "env": env, "log": str(log), "module": module}
        if stderr is not None:
            request["stderr"] = str(stderr)
        try:
            self._process.stdin.write((json.dumps(request) + "\n").encode())
            self._process.stdin.flush()
        except OSError as err:
            self.reason = self.reason or f"it no longer reads ({err})"
            raise
        while not self._started:
            if not self._read(block=True):
                raise OSError(f"the fork server stopped: {self.reason}")
        return ForkedJob(self, self._started.pop(0))

    def poll(self) -> None:
        """Take in the exit reports that have arrived."""
        self._read(block=False)

    def close(self) -> None:
        """Let the server end (its stdin closes); the jobs it started are not touched. One still warming up
        has started none (it reads requests only once warm): it is stopped, not waited for through its imports
        (a resumed sweep with nothing left to run ends at once)."""
        self._read(block=False)
        if not self._warm and self._process.poll() is None:
            self._process.terminate()
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=10)

    def _read(self, block: bool) -> bool:
        """Take in what the server has said; False once it has stopped."""
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        if not select.select([fd], [], [], None if block else 0)[0]:
            return True
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            self.reason = self.reason or f"it exited with code {self._process.wait()}"
            return False
        self._pending += chunk
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            message = json.loads(line)
            if "exited" in message:
                self.exited[message["exited"]] = message["returncode"]
            elif "started" in message:
                self._started.append(message["started"])
            else:
                self._warm, self.reason = message["ready"], message["reason"] or None
        return True


class ForkedJob:
    """A job the server forked, with the part of subprocess.Popen's interface that the launcher uses."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.server.poll()
            self.returncode = self.server.exited.pop(self.pid, None)
            if self.returncode is None and self.server.reason is not None and not _alive(self.pid):
                self.returncode = 1  # the server died before it could report the exit: unknown, not a success
        return self.returncode

    def wait(self) -> int:
        while self.poll() is None:
            time.sleep(_WAIT_SECONDS)
        assert self.returncode is not None
        return self.returncode


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    main()
