"""Graph convolutional networks (notes 004 §10, 000 §9) for the nodes of one graph (`spec.graph`).

A graph convolution is a polynomial in the graph shift operator S (004 eq 56): y = Σ_{k<K} S^k x H_k, the
diffusion sequence x, Sx, S²x, ... computed step by step (eq 53) and weighted by one filter tap H_k per
step; with F features in and F' out each tap is an F×F' matrix (the notes' scalar h_k when F = F' = 1).
A layer is a graph perceptron g(Σ_k S^k x H_k) (eq 61); `layers` of them stack (eq 62), the last without g.
K = 1 leaves the graph out: a per-node MLP.

`variant=nn4g` is Micheli's Neural Network for Graphs (000 §9.2): layer i reads the node's own input and
the sum of its neighbours' states of layer i-1, H^i = g(X W̄^i + S H^{i-1} W^i), with H^0 = X.

S (`shift`): the adjacency A, the normalized adjacency D^-1/2 A D^-1/2 (004 eq 50; the default: its
eigenvalues lie in [-1, 1], so powers neither explode nor vanish with the degrees) or the normalized
Laplacian I - D^-1/2 A D^-1/2 (eq 51). It is kept as a sparse buffer, rebuilt from the data, not saved.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dlrun.data.spec import DataSpec, Graph
from dlrun.models.activations import make_activation
from dlrun.models.base import Network

SHIFTS = ("adjacency", "normalized_adjacency", "normalized_laplacian")


def shift_operator(graph: Graph, kind: str = "normalized_adjacency") -> torch.Tensor:
    """S of `graph` as a sparse (N, N) tensor. Isolated nodes have degree 0: their rows of D^-1/2 are 0."""
    n = graph.num_nodes
    rows, cols = (torch.as_tensor(np.asarray(e), dtype=torch.long) for e in graph.edges)
    values = torch.ones(rows.numel())
    if kind != "adjacency":
        degree = torch.zeros(n).index_add_(0, rows, values)
        scale = torch.where(degree > 0, degree.clamp(min=1).rsqrt(), torch.zeros(n))
        values = scale[rows] * values * scale[cols]
    if kind == "normalized_laplacian":
        diagonal = torch.arange(n)
        rows, cols = torch.cat([rows, diagonal]), torch.cat([cols, diagonal])
        values = torch.cat([-values, torch.ones(n)])
    elif kind not in SHIFTS:
        raise ValueError(f"shift must be one of {SHIFTS}, not {kind!r}")
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n)).coalesce()


class GraphConvolution(nn.Module):
    """y = Σ_{k<K} S^k x H_k: the K diffusion steps side by side, one linear map (the taps stacked)."""

    def __init__(self, in_features: int, out_features: int, K: int):
        super().__init__()
        self.K = K
        self.taps = nn.Linear(K * in_features, out_features)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        diffused = [x]
        for _ in range(self.K - 1):
            diffused.append(torch.sparse.mm(shift, diffused[-1]))  # x_{k+1} = S x_k
        return self.taps(torch.cat(diffused, dim=-1))


class NN4GLayer(nn.Module):
    """Micheli's layer: X W̄ + S H W, the node's input and its neighbours' previous states."""

    def __init__(self, in_features: int, state_features: int, out_features: int):
        super().__init__()
        self.own = nn.Linear(in_features, out_features)
        self.neighbours = nn.Linear(state_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.own(x) + self.neighbours(torch.sparse.mm(shift, state))


class GCN(Network):
    """`layers` graph convolutions of `hidden` features (K taps each), then class scores per node."""

    accepts = frozenset({"flat"})

    def __init__(self, spec: DataSpec, variant: str = "gcn", K: int = 2, layers: int = 2, hidden: int = 32,
                 activation: str = "relu", dropout: float = 0.0, shift: str = "normalized_adjacency"):
        super().__init__(spec)
        if spec.graph is None:
            raise self.refuse("a graph convolution needs the graph its samples are the nodes of.",
                              "Use a graph data set (dataset=sbm, dataset=karate, dataset=planetoid).")
        self.register_buffer("shift", shift_operator(spec.graph, shift), persistent=False)
        self.variant = variant
        features = spec.input_shape[0]
        widths = [hidden] * (layers - 1) + [spec.num_outputs]
        pairs = zip([features, *widths[:-1]], widths, strict=True)  # (features in, features out) per layer
        if variant == "gcn":
            self.convs = nn.ModuleList(GraphConvolution(w_in, w_out, K) for w_in, w_out in pairs)
        else:
            self.convs = nn.ModuleList(NN4GLayer(features, w_in, w_out) for w_in, w_out in pairs)
        self.acts = nn.ModuleList(make_activation(activation) for _ in widths[:-1])
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the features of every node, (N, F), in the graph's order; returns (N, classes)."""
        if x.shape[0] != self.shift.shape[0]:
            raise ValueError(f"a graph network reads all {self.shift.shape[0]} nodes at once, not {x.shape[0]}")
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(self.drop(h), self.shift) if self.variant == "gcn" else conv(x, self.drop(h), self.shift)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h
