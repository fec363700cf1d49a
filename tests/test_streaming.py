"""Streaming (dataset.in_memory): batches from host memory or a memory-mapped file through a DataLoader, the
same batches as the in-memory path in the same order, chosen by a memory budget, with bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from dlrun.config import find_problems
from dlrun.data.datamodule import InMemoryDataModule, Rows
from tests.test_data import _write_cifar
from tests.test_user_data import write_images

QUICK = ["dataset.n_train=300", "trainer.max_epochs=2", "model.width=16", "print_config=false",
         "callbacks.progress_bar=false", "callbacks.model_summary=false"]


@pytest.fixture
def datamodule(compose_cfg):
    def build(name: str, *overrides: str) -> InMemoryDataModule:
        cfg = compose_cfg(f"dataset={name}", *overrides)
        assert find_problems(cfg) == []
        return instantiate(cfg.dataset, seed=cfg.seed, name=name)

    return build


@pytest.mark.parametrize("grouping", ["trainer.steps_per_execution=auto", "trainer.steps_per_execution=1"])
def test_in_memory_and_streamed_runs_give_the_same_metrics(run_dlrun, grouping):
    """Same seed, same batches in the same order, same float32 arithmetic: the same numbers, to the last bit.
    The streamed run makes its batches in two worker processes."""
    in_memory = run_dlrun(*QUICK, grouping, "dataset.in_memory=true", "seed=3")
    streamed = run_dlrun(*QUICK, grouping, "dataset.in_memory=false", "dataset.num_workers=2", "seed=3")
    a, b = in_memory.summary(in_memory.run_dirs[0]), streamed.summary(streamed.run_dirs[-1])
    assert a["data_path"]["mode"] == "in memory" and b["data_path"]["mode"] == "streamed"
    assert b["data_path"]["reason"] == "dataset.in_memory=false"
    assert a["metrics"] == b["metrics"] and a["global_step"] == b["global_step"] and a["best_epoch"] == b["best_epoch"]
    assert "streamed (dataset.in_memory=false)" in " ".join(streamed.stdout.split())


def test_in_memory_and_streamed_runs_agree_under_ddp(run_dlrun):
    """Two CPU processes: each rank streams its own stride of the same permutation, as in memory."""
    in_memory = run_dlrun(*QUICK, "hardware=ddp_cpu", "dataset.in_memory=true")
    streamed = run_dlrun(*QUICK, "hardware=ddp_cpu", "dataset.in_memory=false")
    a, b = in_memory.summary(in_memory.run_dirs[0]), streamed.summary(streamed.run_dirs[-1])
    assert a["world_size"] == b["world_size"] == 2 and b["data_path"]["mode"] == "streamed"
    assert a["metrics"] == b["metrics"] and a["global_step"] == b["global_step"]


def test_auto_streams_when_the_data_exceeds_the_budget_and_says_why(run_dlrun):
    result = run_dlrun(*QUICK, "dataset.memory_budget=50000")  # digits' tensors take ~400 KB
    path = result.summary()["data_path"]
    assert path["mode"] == "streamed" and path["budget"] == 50000 and path["bytes"] > 50000
    assert "exceed the budget" in path["reason"] and "dataset.memory_budget" in path["reason"]
    assert "streamed" in result.stdout and "exceed the budget" in " ".join(result.stdout.split())
    fits = run_dlrun(*QUICK, "dataset.memory_budget=1e9", "trainer.max_epochs=1")
    assert fits.summary(fits.run_dirs[-1])["data_path"]["mode"] == "in memory"


def test_a_budget_smaller_than_one_batch_exits_2(run_dlrun):
    result = run_dlrun(*QUICK, "dataset.memory_budget=1000", check=False)  # a batch of 64 digits: ~17 KB
    out = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, out
    assert "Traceback" not in result.stdout + result.stderr
    assert "one batch of 64 samples" in out and "dataset.memory_budget" in out and "batch_size" in out


def test_streamed_batches_equal_in_memory_batches_under_ddp_striding(datamodule):
    """BatchOrder is one order for both paths: every rank's batches hold the same samples, equally normalized."""
    memory, streamed = datamodule("digits", "dataset.in_memory=true"), datamodule("digits", "dataset.in_memory=false")
    memory.prepare(), streamed.prepare()
    assert torch.equal(memory.norm_stats[0], streamed.norm_stats[0])
    assert torch.equal(memory.norm_stats[1], streamed.norm_stats[1])
    for rank in range(2):
        for split, shuffle in (("train", True), ("test", False)):
            order = {"seed": 5, "epoch": lambda: 4, "rank": rank, "world_size": 2}
            a = memory._batches(split, shuffle, batch_size=13)
            a.order.__dict__.update(order)
            b = streamed._batches(split, shuffle, batch_size=13)
            b.sampler.__dict__.update(order)
            pairs = list(zip(a, b, strict=True))
            assert len(pairs) == len(a) == len(b) > 1
            for (xa, ya), (xb, yb) in pairs:
                assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_the_image_folder_streams_from_its_memory_mapped_cache(datamodule, tmp_path, run_dlrun):
    write_images(tmp_path / "pets", per_class=10, corrupt=False)
    overrides = (f"dataset.root={tmp_path / 'pets'}", f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.size=16")
    streamed = datamodule("image_folder", *overrides, "dataset.in_memory=false")
    streamed.prepare()
    x, _ = streamed.streamed["train"]
    assert isinstance(x, Rows) and x.file is not None and not streamed.splits  # read from the file by batch
    memory = datamodule("image_folder", *overrides, "dataset.in_memory=true")
    memory.prepare()
    xs, ys = next(iter(streamed._batches("val", shuffle=False)))
    assert torch.equal(xs, memory.splits["val"][0]) and torch.equal(ys, memory.splits["val"][1])

    result = run_dlrun("dataset=image_folder", *overrides, "dataset.memory_budget=40000", "dataset.batch_size=4",
                       "model=cnn",
                       "trainer.max_epochs=1", "print_config=false", "callbacks.progress_bar=false")
    summary = result.summary()
    assert summary["data_path"]["mode"] == "streamed" and summary["data_notes"]["cache"] == "read"


def test_a_built_in_vision_data_set_streams_the_same_batches(datamodule, tmp_path):
    """CIFAR-10 (its files written small): streamed from host memory, batch for batch what the in-memory path draws."""
    _write_cifar(tmp_path, np.random.default_rng(1))
    args = (f"dataset.root={tmp_path}", "dataset.download=false", "dataset.batch_size=8")
    streamed = datamodule("cifar10", *args, "dataset.memory_budget=100000")  # its tensors take ~490 KB
    memory = datamodule("cifar10", *args)
    assert streamed.prepare() == memory.prepare()
    assert streamed.data_path["mode"] == "streamed" and "exceed the budget" in streamed.data_path["reason"]
    assert memory.data_path["mode"] == "in memory" and not memory.streamed
    for split, shuffle in (("train", True), ("test", False)):
        pairs = list(zip(memory._batches(split, shuffle), streamed._batches(split, shuffle), strict=True))
        assert len(pairs) == (3 if split == "train" else 1)  # training in batches of 8, evaluation in one
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


PEAK_RSS = textwrap.dedent("""
    import json, resource, sys
    from hydra import compose, initialize_config_dir
    from dlrun import CONF_DIR
    from dlrun.run import build_experiment, build_trainer
    from dlrun.rundir import RunDir

    path, budget = sys.argv[1], sys.argv[2]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["dataset=arrays", f"dataset.path={path}", f"dataset.memory_budget={budget}",
                                           "dataset.batch_size=256", "model.width=16", "trainer.max_epochs=1",
                                           "callbacks.progress_bar=false"])
    def status(key):  # bytes, from the kernel's account of this process
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":"))

    # getrusage's peak includes the imports' (which peaked higher): the kernel's high-water mark is reset instead
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before, before_maxrss = status("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    datamodule, _, module = build_experiment(cfg, {"dataset": "arrays", "model": "mlp"})
    trainer, _, _ = build_trainer(cfg, RunDir(sys.argv[3]), {})
    trainer.fit(module, datamodule=datamodule, weights_only=True)
    print(json.dumps({"before": before, "peak": status("VmHWM"), "before_maxrss": before_maxrss,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "mode": datamodule.data_path["mode"], "steps": trainer.global_step}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status")
def test_peak_memory_stays_bounded_when_streaming_a_file_larger_than_the_budget(tmp_path):
    """A 183 MB memory-mapped X.npy, a 32 MB budget: the process grows by less than the budget plus a constant
    while it reads all of it for the statistics and an epoch (rows are read from the file, not mapped)."""
    n, features = 48_000, 1000
    data = tmp_path / "big"
    data.mkdir()
    x = np.lib.format.open_memmap(data / "X.npy", mode="w+", dtype=np.float32, shape=(n, features))
    rng = np.random.default_rng(0)
    for start in range(0, n, 4000):
        x[start : start + 4000] = rng.standard_normal((4000, features), dtype=np.float32)
    x.flush()
    del x
    np.save(data / "y.npy", rng.integers(0, 3, n))
    budget = 32 << 20
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(data), str(budget), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = measured["peak"] - measured["before"]
    print(f"\nstreaming {(n * features * 4) >> 20} MB with a {budget >> 20} MB budget: peak RSS "
          f"{measured['peak'] >> 20} MB, {grown >> 20} MB above the {measured['before'] >> 20} MB before loading "
          f"(getrusage: {measured['before_maxrss'] >> 20} MB before, {measured['maxrss'] >> 20} MB after)")
    assert measured["mode"] == "streamed" and measured["steps"] > 0
    # generous: the budget plus 96 MB for Lightning's own, a few batches and the statistics' chunks; well below
    # the file, which reading it through the memory map would add (measured here: ~270 MB above before)
    assert grown < budget + (96 << 20) < n * features * 4
