"""The model catalog: shapes and refusals per input kind, learning, initialization, and the notes' claims."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from dlrun import CONF_DIR
from dlrun.config import find_problems
from dlrun.data.spec import DataSpec
from dlrun.data.tabular import Digits
from dlrun.data.text import Text
from dlrun.errors import IncompatibleError, UserError
from dlrun.models.base import build_network
from dlrun.models.init import fans
from dlrun.training.module import Experiment
from dlrun.training.tasks import make_task

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
SEQUENCE_MODELS = ["rnn", "gru", "lstm", "transformer", "tcn", "esn"]  # also language models
FLATTENING = ["logreg", "linear", "mlp"]
INPUT_MODELS = ["autoencoder", "vae"]  # the inputs alone: they return a Reconstructed (tests/test_generative.py)
# What each model reads; everything else must be refused with the model, data set and shape named.
READS = {
    **{m: {"image", "sequence", "flat"} for m in FLATTENING + SEQUENCE_MODELS},
    "cnn": {"image", "sequence"},
    "lenet5": {"image"},
    "vgg": {"image"},
    "resnet": {"image"},
    "gcn": set(),  # the nodes of a graph only: tests/test_graphs.py
    **{m: {"image", "sequence", "flat"} for m in INPUT_MODELS},
    "gan": {"image", "flat"},
    "rbm": {"image", "flat"},
}
# The generative models' outputs: the discriminator's logit (gan), the mean-field reconstruction (rbm)
GENERATIVE_OUTPUT = {"gan": lambda spec: (5,), "rbm": lambda spec: (5, *spec.input_shape)}
CLASSIFIERS = [m for m in MODELS if m not in GENERATIVE_OUTPUT]  # tests/test_gan_and_rbm.py trains the others
SPECS = {
    "image": DataSpec("digits", "multiclass", (1, 8, 8), 10),
    "sequence": DataSpec("adding", "regression", (20, 2), 1),
    "flat": DataSpec("iris", "multiclass", (4,), 3),
    "lm": DataSpec("text", "multiclass", (12, 7), 7, per_step=True, vocab_size=7),
}
# Small versions, so that the learning tests are fast.
SMALL = {
    "mlp": {"width": 32},
    "cnn": {"channels": [8, 16], "hidden": 32},
    "vgg": {"width": 8, "blocks": 2, "hidden": 32},
    "resnet": {"depth": 8, "width": 4},
    "rnn": {"hidden": 32},
    "gru": {"hidden": 32},
    "lstm": {"hidden": 32},
    "transformer": {"d_model": 32, "heads": 4, "ffn": 64, "layers": 1},
    "tcn": {"channels": 16, "dilations": [1, 2]},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def model_cfg(name: str, **knobs):
    """The model's shipped YAML, with knobs changed."""
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    return OmegaConf.merge(cfg, knobs)


def build(name: str, spec: DataSpec, **knobs) -> torch.nn.Module:
    return build_network(model_cfg(name, **knobs), spec, name)


def sample_input(spec: DataSpec, n: int = 5) -> torch.Tensor:
    if spec.vocab_size:
        return torch.randint(0, spec.vocab_size, (n, spec.input_shape[0]))
    return torch.randn(n, *spec.input_shape)


def test_every_model_is_tested():
    assert set(MODELS) == set(READS)


# --- shapes and refusals -------------------------------------------------------------------------
CASES = [(m, kind) for m in MODELS for kind in ("image", "sequence", "flat")]


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_output_shape_or_refusal(name, kind):
    spec = SPECS[kind]
    if kind in READS[name]:
        out = build(name, spec)(sample_input(spec))
        if name in INPUT_MODELS:
            assert out.x_hat.shape == (5, *spec.input_shape)
        else:
            assert out.shape == GENERATIVE_OUTPUT.get(name, lambda spec: (5, spec.num_outputs))(spec)
    else:
        with pytest.raises(IncompatibleError) as err:
            build(name, spec)
        message = str(err.value)
        assert f"model={name}" in message and f"dataset={spec.name}" in message
        assert str(tuple(spec.input_shape)) in message and kind in message


@pytest.mark.parametrize("name", MODELS)
def test_language_model_outputs_or_refusal(name):
    """Token indices (N, T) in, logits (N, T, V) out for the sequence models; the others refuse."""
    spec = SPECS["lm"]
    if name in SEQUENCE_MODELS:
        out = build(name, spec)(sample_input(spec))
        assert out.shape == (5, 12, 7)
    else:
        with pytest.raises(IncompatibleError, match=rf"model={name} cannot take dataset=text.*\(12, 7\)"):
            build(name, spec)


@pytest.mark.parametrize("name", FLATTENING + ["cnn", *SEQUENCE_MODELS])
def test_token_inputs_without_per_step_targets(name):
    """Text classified as a whole: the sequence models embed the indices, mlp/cnn read the one-hot view."""
    spec = DataSpec("text", "multiclass", (12, 7), 3, vocab_size=7)
    assert build(name, spec)(sample_input(spec)).shape == (5, 3)


@pytest.mark.parametrize("name", ["rnn", "transformer", "tcn"])
def test_language_models_are_causal(name):
    """Changing the token at step 6 changes no output before step 6, and the output at step 6."""
    torch.manual_seed(0)
    net = build(name, SPECS["lm"]).eval()
    x = sample_input(SPECS["lm"])
    x2 = x.clone()
    x2[:, 6] = (x[:, 6] + 1) % 7
    out, out2 = net(x), net(x2)
    torch.testing.assert_close(out[:, :6], out2[:, :6])
    assert not torch.allclose(out[:, 6], out2[:, 6])


def test_bidirectional_language_model_is_refused():
    with pytest.raises(IncompatibleError, match="model=lstm cannot take dataset=text.*bidirectional"):
        build("lstm", SPECS["lm"], bidirectional=True)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_transformer_pooling(pooling):
    assert build("transformer", SPECS["image"], pooling=pooling)(sample_input(SPECS["image"])).shape == (
        5,
        10,
    )


def test_cnn_padding_and_pooling_shapes():
    """valid padding shrinks each map by kernel - 1; same keeps it; pool halves it."""
    spec = DataSpec("img", "multiclass", (3, 16, 16), 4)
    net = build("cnn", spec, channels=[4, 4], kernel=3, padding="valid", pool="avg", hidden=0)
    assert net.features(torch.randn(2, 3, 16, 16)).shape == (2, 4, 2, 2)  # 16 -> 14 -> 7 -> 5 -> 2
    net = build("cnn", spec, channels=[4], kernel=5, padding="same", pool="none", hidden=0)
    assert net.features(torch.randn(2, 3, 16, 16)).shape == (2, 4, 16, 16)
    seq = build("cnn", SPECS["sequence"], channels=[4], pool="max")  # 1-D along time: (N, 4, T/2)
    assert seq.features(torch.randn(2, 2, 20)).shape == (2, 4, 10)


def test_mlp_width_list_builds_one_layer_per_entry():
    net = build("mlp", SPECS["flat"], width=[32, 16, 8])
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(4, 32), (32, 16), (16, 8), (8, 3)]


def test_knob_mistakes_are_user_errors(compose_cfg):
    with pytest.raises(IncompatibleError, match="model=cnn cannot take dataset=digits.*shrink"):
        build("cnn", SPECS["image"], channels=[4, 4, 4], kernel=5, padding="valid")
    with pytest.raises(UserError, match="model.hidden = 0"):
        build("gru", SPECS["sequence"], hidden=0)
    with pytest.raises(UserError, match="model.depth = 10"):
        build("resnet", SPECS["image"], depth=10)
    with pytest.raises(UserError, match="not divisible by model.heads"):
        build("transformer", SPECS["image"], d_model=30, heads=4)
    with pytest.raises(UserError, match="model.channels has 2 entries and model.dilations 3"):
        build("tcn", SPECS["sequence"], channels=[8, 8], dilations=[1, 2, 4])
    problems = find_problems(compose_cfg("model=transformer", "model.pooling=max", "model.init=glorot"))
    assert any(p.startswith("model.pooling = 'max'") and "mean, last, cls" in p for p in problems)
    assert any(p.startswith("model.init = 'glorot'") and "xavier" in p for p in problems)


# --- every model learns --------------------------------------------------------------------------
def fit(network: torch.nn.Module, datamodule, epochs: int, lr: float, validate: bool = False) -> dict[str, float]:
    """`epochs` epochs of Adam through dlrun's Experiment (validating each epoch if asked); the last
    epoch's logged metrics."""
    spec = datamodule.prepare()
    module = Experiment(network, make_task(spec), functools.partial(torch.optim.Adam, lr=lr))
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1.0 if validate else 0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def train(network: torch.nn.Module, datamodule, epochs: int, lr: float) -> tuple[float, float]:
    """Training-set loss before and after `epochs` epochs of Adam, through dlrun's Experiment."""
    task = make_task(datamodule.prepare())
    x, y = datamodule.splits["train"]

    def loss() -> float:
        network.eval()
        with torch.no_grad():
            return task.loss(network(x), y).item()

    before = loss()
    network.train()
    fit(network, datamodule, epochs, lr)
    return before, loss()


@pytest.mark.parametrize("name", [m for m in CLASSIFIERS if "image" in READS[m] and m not in INPUT_MODELS])
def test_every_model_learns_digits(name):
    """Eight epochs on 256 digits (sequence models read them row by row) cut the training loss by 70%."""
    pl.seed_everything(0, verbose=False)
    digits = Digits(n_train=256, batch_size=32, seed=0)
    network = build(name, digits.prepare(), **SMALL.get(name, {}))
    before, after = train(network, digits, epochs=8, lr=0.01)
    assert after < 0.3 * before, f"{name}: training loss {before:.3f} -> {after:.3f}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A text with structure to learn: words of a small vocabulary in a fixed order."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("the cat sat on the mat. " * 60, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_sequence_models_learn_a_language_model(name, corpus):
    """Next-character prediction on real token windows (dataset=text): loss falls below half."""
    pl.seed_everything(0, verbose=False)
    text = Text(path=str(corpus), window=16, stride=4, batch_size=32, seed=0)
    network = build(name, text.prepare(), **SMALL.get(name, {}))
    before, after = train(network, text, epochs=5, lr=0.01)
    assert after < 0.5 * before, f"{name}: training loss {before:.3f} -> {after:.3f}"


# --- initialization ------------------------------------------------------------------------------
def test_zero_init_leaves_hidden_units_identical():
    """The notes' symmetry problem: with all weights 0, training moves every hidden unit the same way."""
    torch.manual_seed(0)
    spec = DataSpec("blobs", "multiclass", (6,), 3)
    net = build("mlp", spec, width=8, depth=2, activation="sigmoid", init="zeros")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    first, second, out = (m for m in net.modules() if isinstance(m, torch.nn.Linear))
    for layer in (first, second):
        assert layer.weight.abs().sum() > 0, "training changed the weights"
        torch.testing.assert_close(layer.weight, layer.weight[:1].expand_as(layer.weight))  # identical rows
        torch.testing.assert_close(layer.bias, layer.bias[:1].expand_as(layer.bias))
    torch.testing.assert_close(out.weight, out.weight[:, :1].expand_as(out.weight))  # identical columns


def test_constant_init_behaves_like_zeros(run_dlrun):
    """004 §4.2.2: any constant initialization hinders learning like zeros. A real run with every weight 0.5:
    training moves the weights, yet every hidden unit of a layer stays the copy of the others."""
    result = run_dlrun("print_config=false", "callbacks.model_summary=false", "callbacks.progress_bar=false",
                       "dataset.n_train=300", "trainer.max_epochs=3", "callbacks.early_stopping.enabled=false",
                       "model.width=16", "model.activation=tanh", "model.init=constant", "model.init_value=0.5")
    state = torch.load(result.run_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    hidden = [state[f"network.net.{i}.weight"] for i in (1, 3)]  # Flatten, Linear, Tanh, Linear, Tanh, Linear
    for weight in hidden:
        assert not torch.allclose(weight, torch.full_like(weight, 0.5)), "training changed the weights"
        torch.testing.assert_close(weight, weight[:1].expand_as(weight))  # identical rows: identical units
    out = state["network.net.5.weight"]
    torch.testing.assert_close(out, out[:, :1].expand_as(out))  # each output reads every unit alike
    assert result.summary()["metrics"]["test/acc"] < 0.5  # digits has 10 classes; one feature cannot tell them


# --- dead ReLUs (004 §4.2): val/dead_relu and test/dead_relu ------------------------------------------
def test_dead_relu_fraction_is_the_share_of_units_no_validation_sample_activates():
    """The logged val/dead_relu equals a direct count on the validation split after training."""
    pl.seed_everything(0, verbose=False)
    digits = Digits(n_train=256, batch_size=32, seed=0)
    network = build("mlp", digits.prepare(), width=[48, 24], init_bias=-0.4)
    logged = fit(network, digits, epochs=2, lr=0.01, validate=True)["val/dead_relu"]
    network.eval()
    a, never_positive = digits.splits["val"][0], []
    with torch.no_grad():
        for layer in network.net:
            a = layer(a)
            if isinstance(layer, torch.nn.ReLU):
                never_positive.append((a > 0).sum(0) == 0)
    dead = torch.cat(never_positive)
    assert dead.numel() == 48 + 24 and 0 < dead.sum() < dead.numel()  # some dead, some alive
    assert logged == pytest.approx(dead.float().mean().item())


def test_zero_init_relus_are_dead_and_stay_dead():
    """000 §6.4: with zero weights every ReLU outputs 0 for any input, gets no gradient, and never recovers;
    He init leaves most alive. Networks without an nn.ReLU log no dead_relu."""
    pl.seed_everything(0, verbose=False)
    digits = Digits(n_train=256, batch_size=32, seed=0)
    zeros = fit(build("mlp", digits.prepare(), init="zeros"), digits, epochs=3, lr=0.01, validate=True)
    he = fit(build("mlp", digits.prepare(), init="he"), digits, epochs=3, lr=0.01, validate=True)
    assert zeros["val/dead_relu"] == 1.0 and zeros["val/acc"] < 0.2
    assert he["val/dead_relu"] < 0.5 and he["val/acc"] > 0.8
    tanh = fit(build("mlp", digits.prepare(), activation="tanh"), digits, epochs=1, lr=0.01, validate=True)
    assert "val/acc" in tanh and "val/dead_relu" not in tanh


@pytest.mark.parametrize(
    ("scheme", "variance"),
    [
        ("he", lambda fan_in, fan_out: 2 / fan_in),
        ("xavier", lambda fan_in, fan_out: 2 / (fan_in + fan_out)),
        ("lecun", lambda fan_in, fan_out: 1 / fan_in),
        ("normal", lambda fan_in, fan_out: 0.05**2),
    ],
)
def test_init_variance(scheme, variance):
    """Every weight matrix has the scheme's variance (within 5%), in dense, conv and gated recurrent layers."""
    torch.manual_seed(0)
    mlp = build("mlp", DataSpec("t", "multiclass", (300,), 10), width=[400, 200], init=scheme, init_std=0.05)
    cnn = build(
        "cnn",
        DataSpec("t", "multiclass", (16, 8, 8), 10),
        channels=[64],
        kernel=5,
        init=scheme,
        init_std=0.05,
    )
    lstm = build("lstm", DataSpec("t", "multiclass", (5, 300), 10), hidden=200, init=scheme, init_std=0.05)
    weights = [m.weight for m in mlp.modules() if isinstance(m, torch.nn.Linear)][:2]
    weights.append(cnn.features[0].weight)
    for weight in weights:
        assert weight.var().item() == pytest.approx(variance(*fans(weight)), rel=0.05)
        assert weight.mean().abs().item() < 0.1 * weight.std().item()
    for gate in lstm.rnn.weight_ih_l0.chunk(4):  # each gate on its own: fan_out is one gate's 200
        assert gate.var().item() == pytest.approx(variance(300, 200), rel=0.05)
    for net in (mlp, cnn, lstm):
        assert all((p == 0).all() for n, p in net.named_parameters() if "bias" in n)


def test_init_bias_sets_every_bias():
    """Positive ReLU bias: every weight layer's biases are the constant; normalization layers keep theirs."""
    layers = (
        torch.nn.Linear,
        torch.nn.Conv2d,
        torch.nn.Conv1d,
        torch.nn.RNNBase,
        torch.nn.MultiheadAttention,
    )
    for name in ("mlp", "cnn", "resnet", "lstm", "transformer", "tcn"):
        knobs = {"batch_norm": True} if name in ("mlp", "cnn", "resnet") else {}
        net = build(name, SPECS["image"], init="he", init_bias=0.1, **knobs)
        biases = [
            p
            for m in net.modules()
            if isinstance(m, layers)
            for n, p in m.named_parameters(recurse=False)
            if "bias" in n
        ]
        assert biases and all((b == 0.1).all() for b in biases), name
        norms = [m for m in net.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm))]
        assert all((m.bias == 0).all() and (m.weight == 1).all() for m in norms), name


def test_default_init_is_pytorchs():
    """init=default leaves the layers as PyTorch made them: same seed, same weights as a bare build."""
    torch.manual_seed(3)
    ours = build("mlp", SPECS["flat"], init="default")
    torch.manual_seed(3)
    bare = torch.nn.Linear(4, 128)
    torch.testing.assert_close(ours.net[1].weight, bare.weight)


# --- the notes' claims ---------------------------------------------------------------------------
def test_identity_mlp_is_one_affine_map():
    """Identity activations: W3(W2(W1 x + b1) + b2) + b3 = W x + b with W = W3 W2 W1 (multiplied out)."""
    torch.manual_seed(0)
    net = build("mlp", SPECS["flat"], width=[16, 9, 5], activation="identity").double()
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    weight, bias = torch.eye(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for layer in linear:
        weight, bias = layer.weight @ weight, layer.weight @ bias + layer.bias
    x = torch.randn(50, 4, dtype=torch.float64)
    torch.testing.assert_close(net(x), x @ weight.T + bias, rtol=1e-12, atol=1e-12)
    assert weight.shape == (3, 4)  # a logistic regression's parameters


def test_plain_resnet_has_the_same_layers_without_skips():
    torch.manual_seed(0)
    residual = build("resnet", SPECS["image"], depth=14, residual=True)
    plain = build("resnet", SPECS["image"], depth=14, residual=False)
    projections = sum(p.numel() for n, p in residual.named_parameters() if ".shortcut." in n)
    assert projections > 0  # stages 2 and 3 change the shape: projection shortcuts
    assert (
        sum(p.numel() for p in plain.parameters())
        == sum(p.numel() for p in residual.parameters()) - projections
    )
    # the plain net's weights fit the residual one exactly, projections aside
    missing, unexpected = residual.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".shortcut." in k for k in missing)
    # same weights, different function: the skips are really there in one and absent in the other
    residual.eval(), plain.eval()
    x = sample_input(SPECS["image"])
    assert not torch.allclose(residual(x), plain(x))
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in plain.modules())
    assert n_conv + 1 == 14  # depth counts the conv layers and the final linear one


# --- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_model_runs_end_to_end(run_dlrun):
    """`dlrun model=X debug=fast` for every model on digits, the sequence readers on the adding task, and the
    graph models on sbm.

    One multirun per data set with Hydra's in-process launcher, so torch and Lightning load once.
    """
    on_adding = [m for m in MODELS if "sequence" in READS[m] and m not in FLATTENING]
    on_digits = [m for m in MODELS if "image" in READS[m]]
    for dataset, models in (("digits", on_digits), ("adding", on_adding), ("sbm", ["gcn", "mlp"]),
                              ("karate", ["gcn"])):
        args = ("-m", "hydra/launcher=basic", f"model={','.join(models)}", f"dataset={dataset}", "debug=fast")
        result = run_dlrun(*args, env={"OMP_NUM_THREADS": "1"})
        summaries = [
            json.loads(p.read_text())
            for p in result.output_dir.glob(f"sweeps/*/*dataset={dataset}*/summary.json")
        ]
        done = {s["choices"]["model"]: s for s in summaries}
        assert set(done) == set(models)
        for model, summary in done.items():
            assert summary["status"] == "completed", model
            assert math.isfinite(summary["metrics"]["test/loss"]), model


# --- ensembles (dlrun-eval on several runs) ---------------------------------------------------------------
class Fixed(torch.nn.Module):
    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, x):
        return self.output


def test_ensemble_output_is_the_mean_probability_as_a_logit():
    """Classes: log of the mean softmax; binary: logit of the mean sigmoid, finite where the members saturate;
    regression: the mean. Averaging logits would give other numbers in each case."""
    from dlrun.models.ensemble import Ensemble

    a, b = torch.tensor([[2.0, 0.0, -1.0], [0.0, 5.0, 1.0]]), torch.tensor([[-1.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    logits = Ensemble([Fixed(a), Fixed(b)], "multiclass")(None)
    torch.testing.assert_close(logits.exp(), (a.softmax(-1) + b.softmax(-1)) / 2)
    p, q = torch.tensor([3.0, -60.0, 60.0]), torch.tensor([-1.0, -60.0, 59.0])
    logit = Ensemble([Fixed(p), Fixed(q)], "binary")(None)
    p, q = p.double(), q.double()
    mean, complement = (p.sigmoid() + q.sigmoid()) / 2, ((-p).sigmoid() + (-q).sigmoid()) / 2  # 1 - mean, exact
    torch.testing.assert_close(logit.double(), torch.log(mean) - torch.log(complement), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logit).all()
    torch.testing.assert_close(Ensemble([Fixed(p), Fixed(q)], "regression")(None), (p + q) / 2)
