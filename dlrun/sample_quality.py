"""A sample-quality score without downloads: a classifier trained on the data set's own labels judges samples.

No Inception network can be downloaded on a machine without a network, so dlrun trains its own judge, a
small MLP, on the labelled training split (inputs scaled to [0, 1] as the generative model saw them), and
reports for `SAMPLES` draws of a model's `sample(n, generator)`:

    confidence           the mean of the classifier's top-class probability: near 1 when samples look like
                         some class to it, near 1/K when like none
    class_entropy        the entropy, in bits, of the histogram of predicted classes: log2 K when every class
                         is drawn equally often, 0 when one class only (mode collapse)
    noise_confidence     the same confidence on uniform noise images: the floor a model should beat
    classifier_test_acc  how good the judge is, on the test split

It is a proxy in the spirit of the Inception score, not a measure of what a person sees: a classifier can be
confident on images no one would take for the class, and the two numbers ignore how samples vary within a
class. Compare runs on one data set with it; do not compare its values across data sets.

The classifier is cached in `<paths.data_dir>/sample_quality/`, one file per data set and settings (the
data set's config without its batching knobs, the data seed, the classifier's settings below), loaded with
`weights_only=True`; a file that does not load is replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlrun.data.datamodule import InMemoryDataModule
from dlrun.data.spec import DataSpec
from dlrun.rundir import write_atomic

log = logging.getLogger("dlrun")

SAMPLES = 1000
#: the classifier's settings: part of the cache key, so that changing one trains a new classifier
CLASSIFIER = {"hidden": 256, "steps": 1000, "batch_size": 128, "lr": 1e-3, "max_train": 20000, "noise_weight": 0.5,
              "version": 1}
#: dataset knobs that change how batches are made, not the data: left out of the cache key
_BATCHING_KNOBS = ("batch_size", "in_memory", "memory_budget", "num_workers")
NOTE = ("a proxy: a classifier dlrun trained on this data set's labels scores the samples (no Inception "
        "weights can be downloaded); compare runs on the same data set only")


def sample_quality(
    network: nn.Module, datamodule: InMemoryDataModule, spec: DataSpec, dataset_cfg: Mapping[str, Any],
    data_dir: str | Path, seed: int,
) -> dict[str, Any] | None:
    """summary.json's `sample_quality` for a network that samples, on data with classes; None otherwise."""
    if not callable(getattr(network, "sample", None)) or len(spec.class_names) < 2:
        return None
    classifier = load_or_train_classifier(datamodule, spec, dataset_cfg, Path(data_dir))
    was_training = network.training
    network.eval()
    try:
        samples = network.sample(SAMPLES, generator=torch.Generator().manual_seed(seed)).cpu()
    finally:
        network.train(was_training)
    noise = torch.rand(samples.shape, generator=torch.Generator().manual_seed(seed + 1))
    return {**score_images(classifier.model, samples),
            "noise_confidence": score_images(classifier.model, noise)["confidence"],
            "classifier_test_acc": classifier.test_acc, "samples": SAMPLES, "note": NOTE}


def score_images(classifier: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """The classifier's mean top-class probability over `images` and the entropy (bits) of its predicted-class
    histogram."""
    with torch.no_grad():
        probabilities = F.softmax(classifier(images.float().flatten(1)), dim=1)
    k = probabilities.shape[1]
    histogram = torch.bincount(probabilities.argmax(1), minlength=k).double() / len(images)
    present = histogram[histogram > 0]
    return {"confidence": float(probabilities.max(1).values.mean()),
            "class_entropy": max(0.0, float(-(present * present.log2()).sum())), "max_class_entropy": math.log2(k)}


class Classifier:
    """The judge: an MLP on flattened [0, 1] inputs, and its accuracy on the test split."""

    def __init__(self, spec: DataSpec):
        self.model = nn.Sequential(nn.Linear(spec.flat_features, CLASSIFIER["hidden"]), nn.ReLU(),
                                   nn.Linear(CLASSIFIER["hidden"], len(spec.class_names)))
        self.test_acc = float("nan")


def cache_path(dataset_cfg: Mapping[str, Any], spec: DataSpec, data_seed: int, data_dir: Path) -> Path:
    """Where the classifier of this data set and these settings is kept."""
    data = {k: v for k, v in dataset_cfg.items() if k not in _BATCHING_KNOBS}
    key = json.dumps({"dataset": data, "data_seed": data_seed, "classifier": CLASSIFIER}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return data_dir / "sample_quality" / f"{spec.name}-{digest}.pt"


def load_or_train_classifier(
    datamodule: InMemoryDataModule, spec: DataSpec, dataset_cfg: Mapping[str, Any], data_dir: Path
) -> Classifier:
    path = cache_path(dataset_cfg, spec, datamodule.data_seed, data_dir)
    classifier = Classifier(spec)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            classifier.model.load_state_dict(saved["state_dict"])
            classifier.test_acc = float(saved["test_acc"])
            return classifier
        except Exception as err:  # damaged, or from other settings: train anew and replace it
            log.warning("sample-quality classifier %s does not load (%s): training a new one", path, err)
    train_classifier(classifier, datamodule)
    buffer = io.BytesIO()
    torch.save({"state_dict": classifier.model.state_dict(), "test_acc": classifier.test_acc}, buffer)
    write_atomic(path, buffer.getvalue())
    return classifier


def train_classifier(classifier: Classifier, datamodule: InMemoryDataModule) -> None:
    """Adam on up to CLASSIFIER['max_train'] training samples, on the CPU, from a fixed seed: the same data
    give the same classifier, and the run's random state is left as it was.

    Each batch also holds as many uniform-noise images, whose target is the uniform distribution over the
    classes (outlier exposure, Hendrycks et al. 2019): a plain classifier is often more confident on noise
    than on real inputs, which would make it a judge that noise passes."""
    n = min(datamodule.split_size("train"), CLASSIFIER["max_train"])
    x, y = datamodule.inputs("train", n).float().flatten(1), datamodule.labels("train", n).long().reshape(-1)
    model, size = classifier.model, CLASSIFIER["batch_size"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: one thread beats several that spin-wait on busy cores
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for layer in model:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
            optimizer = torch.optim.Adam(model.parameters(), lr=CLASSIFIER["lr"])
            model.train()
            for _ in range(CLASSIFIER["steps"]):
                index = torch.randint(len(x), (size,))
                noise = torch.rand(size, x.shape[1])
                loss = F.cross_entropy(model(x[index]), y[index])
                loss = loss - CLASSIFIER["noise_weight"] * F.log_softmax(model(noise), dim=1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    x_test = datamodule.inputs("test", datamodule.split_size("test")).float().flatten(1)
    y_test = datamodule.labels("test", len(x_test)).long().reshape(-1)
    with torch.no_grad():
        classifier.test_acc = float((model(x_test).argmax(1) == y_test).float().mean())
