"""Echo state network (notes 000 §8.10): the reservoir is fixed, the readout is all that trains, and that is
enough to forecast a sine."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from dlrun.data.sequences import SineSeq
from dlrun.data.spec import DataSpec
from dlrun.errors import UserError
from tests.test_models import build, fit

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


SPEC = DataSpec("sine_seq", "regression", (20, 1), 1)


def test_reservoir_has_the_configured_spectral_radius_and_density():
    torch.manual_seed(0)
    esn = build("esn", SPEC, reservoir=100, spectral_radius=0.7, density=0.2)
    w = esn.recurrent.double()
    assert torch.linalg.eigvals(w).abs().max().item() == pytest.approx(0.7, rel=1e-6)
    assert (w != 0).float().mean().item() == pytest.approx(0.2, abs=0.03)
    assert esn.input_weights.shape == (100, 1) and esn.input_weights.abs().max() <= 1.0


def test_leak_rate_keeps_the_past_state():
    """h_t = (1 - a) h_{t-1} + a tanh(U x_t + W h_{t-1}): with a zero input after the first step, a smaller
    leak rate keeps more of the first step's state."""
    x = torch.zeros(1, 20, 1)
    x[0, 0, 0] = 1.0
    memory = {}
    for a in (1.0, 0.2):
        torch.manual_seed(0)
        states = build("esn", SPEC, leak_rate=a, spectral_radius=0.5).states(x)
        memory[a] = states[0, -1].norm() / states[0, 0].norm()
    assert memory[0.2] > 10 * memory[1.0]
    with pytest.raises(UserError, match="model.leak_rate = 0"):
        build("esn", SPEC, leak_rate=0.0)


def test_only_the_readout_trains_and_it_forecasts_a_sine():
    """Through dlrun's Experiment: the reservoir's W and U are buffers that stay as drawn, the readout is the
    only parameter set, and five epochs bring the validation MSE far below the variance of the targets
    (predicting their mean): R² above 0.9."""
    pl.seed_everything(0, verbose=False)
    data = SineSeq(n_samples=1000, batch_size=32, seed=0)
    esn = build("esn", data.prepare())
    assert [name for name, _ in esn.named_parameters()] == ["readout.weight", "readout.bias"]
    reservoir = {name: buffer.clone() for name, buffer in esn.named_buffers()}
    assert set(reservoir) == {"recurrent", "input_weights"} and set(reservoir) <= set(esn.state_dict())
    readout = esn.readout.weight.detach().clone()
    metrics = fit(esn, data, epochs=5, lr=0.01, validate=True)
    for name, buffer in esn.named_buffers():
        assert torch.equal(buffer, reservoir[name]), f"{name} changed"
    assert not torch.equal(esn.readout.weight, readout)
    assert metrics["val/r2"] > 0.9, metrics
