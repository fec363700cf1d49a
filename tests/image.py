"""The Dockerfile built for real, with podman, on a Debian base bootstrapped here (no registry needed).

The base (debootstrap, ~2 minutes) and the image's layers stay in podman's store between test sessions:
a second session rebuilds only the layers whose files changed (dlrun's code: seconds; pyproject.toml or
constraints.txt: the dependencies again, ~3 minutes). The build installs with this machine's pip
configuration (its indexes, wheel directories, constraints and CA bundle), mounted read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/dlrun-test-base:bookworm"
IMAGE = "localhost/dlrun:test"
PROGRAMS = ("podman", "runc", "debootstrap")


def unavailable() -> str | None:
    """Why the image cannot be built here, or None."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return (f"podman is not installed (missing {', '.join(missing)}); .ci/run installs it with "
                "apt-get install podman runc debootstrap")
    if os.getuid() != 0:
        return "the container tests run podman as root (debootstrap and a rootful store); run them as root"
    return None


def _podman(*args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def ensure_base() -> None:
    """A minimal Debian bookworm with python3, imported into podman once (it stays in podman's store)."""
    if _podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "bookworm", str(root), "http://deb.debian.org/debian"],
                       check=True, capture_output=True, timeout=1800)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True, capture_output=True,
                       timeout=600)
        tar.wait()


def pip_mounts() -> list[str]:
    """`-v` options that give the build this machine's pip configuration: the configuration files, and
    the files and directories they (and PIP_* variables) name: indexes, wheel dirs, constraints, CA bundle."""
    debug = subprocess.run([sys.executable, "-m", "pip", "config", "debug"], capture_output=True, text=True).stdout
    home = str(Path.home())
    mounts: dict[str, str] = {}
    section = ""
    for line in debug.splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
        elif line.endswith(", exists: True"):
            path = line.strip().removesuffix(", exists: True")
            # the build runs as root: a user-level file goes to root's home
            mounts[path] = "/root" + path[len(home):] if section == "user" and path.startswith(home) else path
        elif ":" in line or "=" in line:
            value = line.split("=", 1)[1] if section == "env_var" else line.split(": ", 1)[-1]
            for word in value.strip("'\" ").split():
                path = word.removeprefix("file://").rstrip("/")
                if path.endswith("/simple"):  # a local index's pages link to its files beside it
                    path = str(Path(path).parent)
                if path.startswith("/") and Path(path).exists():
                    mounts[path] = path
    kept = {p: t for p, t in mounts.items() if not any(p != q and p.startswith(q + "/") for q in mounts)}
    return [f"--volume={path}:{target}:ro" for path, target in sorted(kept.items())]


def build() -> str:
    """Build the Dockerfile on the bootstrapped base; the image's name."""
    ensure_base()
    _podman("build", "--network=host", f"--build-arg=BASE_IMAGE={BASE_IMAGE}", *pip_mounts(), "--tag", IMAGE,
            str(REPO))
    return IMAGE


def run(*args: str, user: str | None = None, volumes: dict[Path, str] | None = None,
        entrypoint: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`podman run --rm` of the image, as `docker run` would: without a network, optionally as `user`."""
    options = ["--network=none", "--env=COLUMNS=120"]
    options += [f"--user={user}"] if user else []
    options += [f"--volume={host}:{inside}" for host, inside in (volumes or {}).items()]
    options += [f"--entrypoint={entrypoint}"] if entrypoint else []
    return _podman("run", "--rm", *options, IMAGE, *args, timeout=timeout, check=False)
