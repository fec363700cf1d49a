"""Graph data sets for node classification (notes 000 §9, 004 §10): one graph, its nodes the samples.

A `GraphDataModule` holds the node features (N, F), the labels and the edges of one graph; the DataSpec
carries the graph (`spec.graph`) so that a graph network builds its shift operator from it. The nodes are
split into train/val/test, and every batch of a split is the whole graph: the features of all N nodes and
the labels of the split's nodes, -1 elsewhere (the task scores only those; dlrun/training/tasks.py). A
training epoch is `steps_per_epoch` full-graph steps. A network that ignores the graph (model=mlp) reads
the same batches as N independent feature vectors, which makes the comparison with a graph network fair.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dlrun.data.datamodule import InMemoryDataModule
from dlrun.data.spec import DataSpec, Graph
from dlrun.data.split import cut as seeded_cut
from dlrun.data.vision import _ArraysOnlyUnpickler
from dlrun.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class GraphArrays:
    """What `load_graph()` returns. `edges` is (2, E): each undirected edge once or in both directions.
    `splits` gives each split's node indices where the data set has an official split; else one is drawn."""

    features: np.ndarray
    labels: np.ndarray
    edges: np.ndarray
    class_names: tuple[str, ...] = ()
    splits: dict[str, np.ndarray] | None = None


class FullGraph:
    """A split's batches: the whole graph `repeats` times (one full-graph step each)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, repeats: int = 1):
        self.x, self.y, self.repeats = x, y, repeats

    def __len__(self) -> int:
        return self.repeats

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.repeats):
            yield self.x, self.y


class GraphDataModule(InMemoryDataModule):
    """Base of the graph data sets: subclasses implement `load_graph()`. `dataset.batch_size` does not
    apply (a batch is the whole graph); `n_train` keeps that many training nodes."""

    task = "node_classification"

    def __init__(self, steps_per_epoch: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.steps_per_epoch = steps_per_epoch

    def load_graph(self) -> GraphArrays:
        raise NotImplementedError

    def prepare(self) -> DataSpec:
        if self.spec is not None:
            return self.spec
        data = self.load_graph()
        n = len(data.labels)
        edges = _undirected(np.asarray(data.edges, dtype=np.int64), n)
        nodes = data.splits or self._split_nodes(data.labels)
        if self.n_train is not None and self.n_train < len(nodes["train"]):
            nodes["train"] = np.sort(np.random.default_rng(self.data_seed).permutation(nodes["train"])[: self.n_train])
        x = torch.as_tensor(np.asarray(data.features, dtype=np.float32))
        if self.normalize:  # statistics of the training nodes only, as for any data set
            train = x[torch.as_tensor(nodes["train"])]
            self.norm_stats = self._fit_normalization(len(train), lambda a, b: train[a:b])
            x = self._normalized(x)
        labels = torch.as_tensor(np.asarray(data.labels, dtype=np.int64))
        self.splits = {}
        for split in SPLITS:
            y = torch.full_like(labels, -1)
            y[nodes[split]] = labels[nodes[split]]
            self.splits[split] = (x, y)
        self.notes = {f"{split} nodes": len(nodes[split]) for split in SPLITS}
        self.data_path = {"mode": "in memory", "reason": "one graph, one batch", "budget": None,
                          "bytes": x.numel() * 4 + 3 * labels.numel() * 8}
        n_classes = int(labels.max()) + 1
        names = data.class_names or tuple(str(i) for i in range(n_classes))
        self.spec = DataSpec(self.name, self.task, (x.shape[1],), len(names), names, graph=Graph(n, edges))
        return self.spec

    def _split_nodes(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """A stratified split of the nodes from the data seed, with dataset.val_fraction and test_fraction."""
        index = np.arange(len(labels))

        def cut(part: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
            return seeded_cut(part, fraction, self.data_seed, labels[part])

        rest, test = cut(index, self.test_fraction)
        train, val = cut(rest, self.val_fraction / (1.0 - self.test_fraction))
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}

    def split_size(self, split: str) -> int:
        return int((self.splits[split][1] >= 0).sum())

    def _batches(self, split: str, shuffle: bool, batch_size: int | None = None) -> FullGraph:
        x, y = self.splits[split]
        return FullGraph(x, y, self.steps_per_epoch if shuffle else 1)


def _undirected(edges: np.ndarray, n: int) -> np.ndarray:
    """Each edge in both directions, once, without self-loops (a graph convolution's S^0 term is the node
    itself); checked against the number of nodes."""
    if edges.ndim != 2 or edges.shape[0] != 2:
        raise DataError(f"the edges have shape {edges.shape}, not (2, E).")
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise DataError(f"an edge names node {int(edges.max() if edges.max() >= n else edges.min())}, and the "
                        f"graph has nodes 0..{n - 1}.", "Check that the graph and the features belong together.")
    both = np.concatenate([edges, edges[::-1]], axis=1)
    both = both[:, both[0] != both[1]]
    return np.unique(both, axis=1) if both.size else both


class SBM(GraphDataModule):
    """A stochastic block model drawn from the data seed: `nodes` nodes in `communities` equal communities
    (the labels); two nodes are linked with probability p_in within a community, p_out across. Each
    community has a random mean feature vector (unit length on average); a node's features are its
    community's mean plus Gaussian noise of std `feature_noise` per feature, so that with a large noise the
    features alone say little about the label, and averaging them over neighbours (a graph convolution)
    says much more."""

    def __init__(self, nodes: int = 300, communities: int = 3, p_in: float = 0.1, p_out: float = 0.01,
                 features: int = 16, feature_noise: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.nodes, self.communities = nodes, communities
        self.p_in, self.p_out = p_in, p_out
        self.features, self.feature_noise = features, feature_noise

    def load_graph(self) -> GraphArrays:
        rng = np.random.default_rng(self.data_seed)
        labels = np.arange(self.nodes) % self.communities
        same = labels[:, None] == labels[None, :]
        linked = rng.random((self.nodes, self.nodes)) < np.where(same, self.p_in, self.p_out)
        i, j = np.nonzero(np.triu(linked, k=1))
        means = rng.normal(0.0, 1.0 / np.sqrt(self.features), size=(self.communities, self.features))
        x = means[labels] + rng.normal(0.0, self.feature_noise, size=(self.nodes, self.features))
        names = tuple(f"community {c}" for c in range(self.communities))
        return GraphArrays(x.astype(np.float32), labels.astype(np.int64), np.stack([i, j]), names)


class Karate(GraphDataModule):
    """Zachary's karate club (34 members, 78 friendships; networkx ships it): the label is the faction a
    member joined after the club split, "Mr. Hi" or "Officer". The graph has no node features: each node's
    input is its one-hot identity (34 features), so only the edges tell the factions apart."""

    def load_graph(self) -> GraphArrays:
        import networkx as nx

        club = nx.karate_club_graph()
        names = ("Mr. Hi", "Officer")
        labels = np.array([names.index(club.nodes[v]["club"]) for v in club.nodes], dtype=np.int64)
        edges = np.array(list(club.edges), dtype=np.int64).T
        return GraphArrays(np.eye(len(labels), dtype=np.float32), labels, edges, names)


class Planetoid(GraphDataModule):
    """Cora, CiteSeer or PubMed in the Planetoid files (Yang et al. 2016, as Kipf & Welling's GCN reads them):
    `<root>/ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}`. x/tx/allx are scipy sparse feature matrices
    (x: the labelled training nodes, allx: every node but the test ones, tx: the test nodes), y/ty/ally their
    one-hot labels, graph a dict from a node to its neighbours, test.index the test nodes' ids, one per line.
    The official split: the nodes of x train, the next 500 validate, those of test.index test. The pickles
    are read without running code (only arrays, the sparse matrices' fields and the neighbour dict)."""

    def __init__(self, root: str = "data/planetoid", graph: str = "cora", **kwargs):
        super().__init__(**kwargs)
        self.root, self.graph_name = Path(root).expanduser(), graph

    def load_graph(self) -> GraphArrays:
        parts = {part: self._read(part) for part in ("x", "y", "tx", "ty", "allx", "ally", "graph")}
        test_file = self.root / f"ind.{self.graph_name}.test.index"
        try:
            test_index = np.array([int(line) for line in test_file.read_text().split()], dtype=np.int64)
        except FileNotFoundError:
            raise self._missing(test_file) from None
        except ValueError as err:
            raise DataError(f"{test_file} is not a list of node ids, one per line: {err}") from None
        allx, tx = _features(parts["allx"], "allx"), _features(parts["tx"], "tx")
        ally, ty = _labels(parts["ally"], "ally"), _labels(parts["ty"], "ty")
        n_train = len(_labels(parts["y"], "y"))
        if len(allx) != len(ally) or len(tx) != len(ty) or len(tx) != len(test_index) or allx.shape[1] != tx.shape[1]:
            raise DataError(f"the Planetoid files of {self.graph_name} in {self.root} do not fit together: allx "
                            f"{allx.shape}, ally {ally.shape}, tx {tx.shape}, ty {ty.shape}, {len(test_index)} test ids.")
        n = max(len(allx), int(test_index.max()) + 1) if len(test_index) else len(allx)
        # test nodes may be absent from the graph (CiteSeer's isolated ones): they keep zero features, no label
        features = np.zeros((n, allx.shape[1]), dtype=np.float32)
        labels = np.full(n, -1, dtype=np.int64)
        features[: len(allx)], labels[: len(allx)] = allx, ally
        features[test_index], labels[test_index] = tx, ty
        unlabelled = labels < 0
        labels[unlabelled] = 0  # never in a split: their label is not read
        graph = parts["graph"]
        edges = [(int(v), int(u)) for v, neighbours in graph.items() for u in neighbours]
        edges = np.array(edges, dtype=np.int64).T if edges else np.zeros((2, 0), dtype=np.int64)
        splits = {"train": np.arange(n_train), "val": np.arange(n_train, min(n_train + 500, len(allx))),
                  "test": np.sort(test_index)}
        splits = {k: v[~unlabelled[v]] for k, v in splits.items()}
        return GraphArrays(features, labels, edges, splits=splits)

    def _read(self, part: str):
        path = self.root / f"ind.{self.graph_name}.{part}"
        try:
            with open(path, "rb") as f:
                value = _PlanetoidUnpickler(f, encoding="latin1").load()  # written by Python 2
        except FileNotFoundError:
            raise self._missing(path) from None
        except _Refused as err:
            raise DataError(f"{path} is refused: {err} (loading it could run code).",
                            "Use the published Planetoid files (github.com/kimiyoung/planetoid, data/).") from None
        except Exception as err:  # truncated, not a pickle at all
            raise DataError(f"{path} is not a Planetoid file: {type(err).__name__}: {err}") from None
        if part == "graph" and not isinstance(value, dict):
            raise DataError(f"{path} is not a Planetoid graph (a dict from node to neighbours).")
        return value

    def _missing(self, path: Path) -> DataError:
        return DataError(f"dataset=planetoid: {path} does not exist.",
                         f"Put the Planetoid files ind.{self.graph_name}.{{x,tx,allx,y,ty,ally,graph,test.index}} in "
                         f"dataset.root (now {self.root}), or set dataset.root to their folder.")


class _Refused(pickle.UnpicklingError):
    """A name a Planetoid file never holds: loading it could run code."""


class _SparseFields:
    """Stands in for a pickled scipy sparse matrix: unpickling only stores its fields (no scipy code runs);
    `_features` builds the matrix from them, checked."""


def _reconstructor(cls, base, state):
    """copyreg._reconstructor, which protocols 0 and 1 name to rebuild an object, for _SparseFields only."""
    if cls is not _SparseFields or base is not object or state is not None:
        raise _Refused("it rebuilds an object other than a sparse matrix")
    return _SparseFields()


# Beyond arrays: the neighbour dict (a defaultdict of lists) and the classes of scipy's sparse matrices,
# which become _SparseFields (scipy moved them from scipy.sparse.csr to scipy.sparse._csr; Python 2 spelled
# builtins and copyreg differently).
_PLANETOID_NAMES = {
    ("collections", "defaultdict"): defaultdict, ("__builtin__", "list"): list, ("builtins", "list"): list,
    ("copy_reg", "_reconstructor"): _reconstructor, ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object, ("builtins", "object"): object,
    **{(module, "csr_matrix"): _SparseFields for module in ("scipy.sparse.csr", "scipy.sparse._csr")},
}


class _PlanetoidUnpickler(_ArraysOnlyUnpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PLANETOID_NAMES:
            return _PLANETOID_NAMES[(module, name)]
        try:
            return super().find_class(module, name)
        except pickle.UnpicklingError as err:
            raise _Refused(str(err)) from None


def _features(value, part: str) -> np.ndarray:
    """A feature matrix as dense float32: a CSR matrix's fields, or an array."""
    if isinstance(value, _SparseFields):
        import scipy.sparse

        fields = vars(value)
        try:
            shape = tuple(int(d) for d in fields.get("_shape", fields.get("shape")))
            matrix = scipy.sparse.csr_matrix((fields["data"], fields["indices"], fields["indptr"]), shape=shape)
            matrix.check_format(full_check=True)
            return matrix.toarray().astype(np.float32)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"ind.*.{part} is not a valid sparse matrix: {err}") from None
    array = np.asarray(value)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise DataError(f"ind.*.{part} is not a feature matrix (nodes x features), but {array.shape} {array.dtype}.")
    return array.astype(np.float32)


def _labels(value, part: str) -> np.ndarray:
    """One-hot label rows as class indices (an all-zero row: -1, unlabelled)."""
    array = np.asarray(value)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise DataError(f"ind.*.{part} is not a one-hot label matrix (nodes x classes), but {array.shape}.")
    return np.where(array.any(axis=1), array.argmax(axis=1), -1).astype(np.int64)
