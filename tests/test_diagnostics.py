"""What the notes' experiments measure beyond the loss, each on a real run: the training data in evaluation
mode (train_eval/*), per-layer activation statistics, a two-weight network's path over the loss contours,
and training on all the training data, without a validation split."""

from __future__ import annotations

import csv

import torch

FAST = ["print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false"]


def _rows(path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


# --- the weight trajectory (004 §6.2.2, Figs. 94-97) --------------------------------------------------
def test_ravine_run_draws_its_weight_path(run_dlrun):
    """experiment=ravine's linear model has two weights: trajectory.csv holds them before training and after
    each optimizer step, ending at the trained weights (last.ckpt's); momentum takes them towards w* = (10, 1)."""
    result = run_dlrun(*FAST, "experiment=ravine", "optim=momentum", "trainer.max_epochs=5")
    summary, run_dir = result.summary(), result.run_dir
    rows = _rows(run_dir / "trajectory.csv")
    assert list(rows[0]) == ["step", "net.1.weight[0, 0]", "net.1.weight[0, 1]"]
    assert len(rows) == summary["global_step"] + 1 == 5 * 8 + 1  # the start, then 8 steps an epoch
    path = torch.tensor([[float(r["net.1.weight[0, 0]"]), float(r["net.1.weight[0, 1]"])] for r in rows])
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["network.net.1.weight"]
    torch.testing.assert_close(path[-1], last.reshape(-1).double().to(path.dtype))
    optimum = torch.tensor([10.0, 1.0])
    assert (path[-1] - optimum).norm() < 0.5 * (path[0] - optimum).norm()
    assert (run_dir / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_diverging_run_still_draws_its_path(run_dlrun):
    """004 Fig. 94 (bottom): plain SGD at lr 1.2 leaves the ravine; the picture shows the steps it took."""
    result = run_dlrun(*FAST, "experiment=ravine", "optim.lr=1.2")
    summary = result.summary()
    assert summary["status"] == "diverged"
    rows = _rows(result.run_dir / "trajectory.csv")
    assert len(rows) == summary["diverged"]["step"] + 2  # the start and every step up to the bad one
    assert abs(float(rows[-1]["net.1.weight[0, 1]"])) > 10  # w2 oscillates outwards
    assert (result.run_dir / "trajectory.png").is_file()
