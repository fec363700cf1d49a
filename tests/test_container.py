"""The Docker image, built for real (podman, on a bootstrapped Debian base) and run as the README says:
as any uid, with outputs on a mounted directory that belongs to that user."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests import image

pytestmark = [pytest.mark.container, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def _owned_dirs(tmp_path: Path, uid: int) -> dict[Path, str]:
    """outputs/ and data/ as `mkdir -p outputs data` makes them for a user with this uid."""
    volumes = {}
    for name in ("outputs", "data"):
        path = tmp_path / name
        path.mkdir()
        os.chown(path, uid, uid)
        volumes[path] = f"/{name}"
    return volumes


def test_image_runs_dlrun_help(dlrun_image):
    proc = image.run("--help")
    assert proc.returncode == 0, proc.stderr
    assert "dlrun" in proc.stdout and "hardware" in proc.stdout


def test_image_resolves_the_constraints(dlrun_image):
    """The image holds exactly the releases of constraints.txt, as a fresh virtual environment does."""
    proc = image.run("freeze", "--exclude=dlrun", "--exclude=pip", "--exclude=setuptools", entrypoint="pip")
    assert proc.returncode == 0, proc.stderr
    pinned = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    installed = dict(line.split("==") for line in proc.stdout.lower().replace("_", "-").split())
    assert {name: version.split("+")[0] for name, version in installed.items()} == {
        name: pinned[name] for name in installed}
    assert installed["torch"].startswith("2.14.1") and installed["torchvision"].startswith("0.29.1")


@pytest.mark.parametrize("uid", [os.getuid(), 1234], ids=["caller", "uid-1234"])
def test_readme_command_runs_as_any_user(dlrun_image, tmp_path, uid):
    """docker run --user "$(id -u):$(id -g)" -v "$PWD/outputs:/outputs" ... dlrun debug=fast, for the
    calling user and for another uid: the run directory lands on the host, owned by that user."""
    volumes = _owned_dirs(tmp_path, uid)
    proc = image.run("debug=fast", user=f"{uid}:{uid}", volumes=volumes)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (summary_file,) = (tmp_path / "outputs" / "runs").glob("*/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "completed"
    assert summary_file.stat().st_uid == uid and (summary_file.parent / "checkpoints" / "best.ckpt").exists()


def test_two_job_sweep_in_the_image(dlrun_image, tmp_path):
    volumes = _owned_dirs(tmp_path, os.getuid())
    proc = image.run("-m", "model=mlp,logreg", "debug=fast", user=f"{os.getuid()}:{os.getgid()}", volumes=volumes)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep,) = (tmp_path / "outputs" / "sweeps").iterdir()
    summaries = sorted(sweep.glob("*/summary.json"))
    assert [p.parent.name.split("_")[0] for p in summaries] == ["0", "1"]
    assert all(json.loads(p.read_text())["status"] == "completed" for p in summaries)
    assert (sweep / "sweep_summary.csv").exists()


def test_output_dir_the_container_cannot_write_is_a_clear_error(dlrun_image, tmp_path):
    """What happens when Docker creates $PWD/outputs itself (as root) and the run is another user's."""
    volumes = _owned_dirs(tmp_path, 0)
    proc = image.run("debug=fast", user="1234:1234", volumes=volumes)
    assert proc.returncode == 2
    assert "Output directory not writable" in proc.stderr and "--user" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not any((tmp_path / "outputs").iterdir())
