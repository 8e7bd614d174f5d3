"""Graph extraction (torch.fx): exact nodes and edges, residual sums, virtual edges, refused inputs."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnn_fast.ghn import SPACES, SampledCNN, extract_graph, sample_architectures
from mnn_fast.training.models import build_model


class Tiny(nn.Module):
    """conv-BN-ReLU, a second conv with a residual sum, global average pool, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.drop = nn.Dropout(0.5)  # transparent: no node
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = self.conv2(h) + h
        return self.fc(self.drop(torch.flatten(self.pool(h), 1)))


TINY_NODES = [("x", "input", (1, 8, 8)), ("conv", "conv", (4, 8, 8)), ("bn", "bn", (4, 8, 8)),
              ("relu", "relu", (4, 8, 8)), ("conv2", "conv", (4, 8, 8)), ("add", "sum", (4, 8, 8)),
              ("pool", "avg_pool", (4, 1, 1)), ("flatten", "flatten", (4,)), ("fc", "linear", (3,))]
TINY_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (3, 5), (4, 5), (5, 6), (6, 7), (7, 8)]


def test_known_net_has_the_expected_nodes_edges_and_parameters():
    g = extract_graph(Tiny(), (1, 8, 8))
    assert [(n.name, n.op, n.out_shape) for n in g.nodes] == TINY_NODES
    assert list(g.edges) == TINY_EDGES
    assert {n.name: dict(n.params) for n in g.nodes if n.params} == {
        "conv": {"weight": (4, 1, 3, 3), "bias": (4,)}, "bn": {"weight": (4,), "bias": (4,)},
        "conv2": {"weight": (4, 4, 3, 3)}, "fc": {"weight": (3, 4), "bias": (3,)}}
    assert g.param_names() == [k for k, _ in Tiny().named_parameters()]


def test_extraction_leaves_the_model_and_its_statistics_unchanged():
    model = Tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extract_graph(model, (1, 8, 8))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_virtual_edges_of_the_known_net():
    g = extract_graph(Tiny(), (1, 8, 8))
    d2 = [(0, 2, 2), (1, 3, 2), (2, 4, 2), (2, 5, 2), (3, 6, 2), (4, 6, 2), (5, 7, 2), (6, 8, 2)]
    assert g.virtual_edges(1) == []
    assert g.virtual_edges(2) == d2
    # relu -> add is a real edge (distance 1), so the longer path through conv2 gives no virtual edge.
    assert (3, 5, 2) not in g.virtual_edges(3)
    assert g.virtual_edges(3) == sorted(d2 + [(0, 3, 3), (1, 4, 3), (1, 5, 3), (2, 6, 3), (3, 7, 3), (4, 7, 3),
                                              (5, 8, 3)])


def _all_pairs_shortest(g):
    n, inf = len(g), float("inf")
    d = [[0 if i == j else inf for j in range(n)] for i in range(n)]
    for u, v in g.edges:
        d[u][v] = 1
    for k, i, j in itertools.product(range(n), repeat=3):  # Floyd-Warshall, k outermost
        d[i][j] = min(d[i][j], d[i][k] + d[k][j])
    return d


@pytest.mark.parametrize("s", [2, 4])
def test_virtual_edges_are_exactly_the_pairs_within_distance_s(s):
    g = extract_graph(build_model("resnet20", 10, (1, 8, 8)), (1, 8, 8))
    d = _all_pairs_shortest(g)
    expected = sorted((u, v, int(d[u][v])) for u in range(len(g)) for v in range(len(g)) if 2 <= d[u][v] <= s)
    assert g.virtual_edges(s) == expected  # every pair within distance s, and none beyond
    assert {dist for _, _, dist in expected} == set(range(2, s + 1))
    assert any(s < d[u][v] < float("inf") for u in range(len(g)) for v in range(len(g)))  # pairs beyond s exist


def test_residual_sums_are_sum_nodes_with_two_inputs():
    g = extract_graph(build_model("resnet20", 10, (1, 8, 8)), (1, 8, 8))
    sums = [i for i, n in enumerate(g.nodes) if n.op == "sum"]
    assert len(sums) == 9  # one per basic block
    assert all(len(g.inputs_of(i)) == 2 for i in sums)
    # Down-sampling blocks add the option-A shortcut: a strided slice, then channel padding.
    shortcut_ops = sorted({g.nodes[u].op for i in sums for u in g.inputs_of(i)})
    assert shortcut_ops == ["bn", "pad", "relu"]
    assert [g.nodes[g.inputs_of(p)[0]].op for p in range(len(g)) if g.nodes[p].op == "pad"] == ["slice", "slice"]


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "resnet20"])
def test_project_models_cover_every_parameter(name):
    model = build_model(name, 10, (1, 8, 8))
    g = extract_graph(model, (1, 8, 8))
    assert sorted(g.param_names()) == sorted(k for k, _ in model.named_parameters())
    assert g.nodes[0].op == "input" and g.nodes[-1].op == "linear" and g.nodes[-1].out_shape == (10,)


def test_sampled_net_graph_matches_its_spec():
    spec = sample_architectures(SPACES["deeper"], 1, 3, 8)[0]
    g = extract_graph(SampledCNN(spec, 1, 10), (1, 8, 8))
    ops = [n.op for n in g.nodes]
    assert ops.count("conv") == len(spec.widths)
    assert ops.count("sum") == sum(spec.residual)
    assert ops.count("max_pool") == sum(spec.pools)
    assert ops.count("bn") == (len(spec.widths) if spec.batch_norm else 0)


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 8)

    def forward(self, x):
        return self.rnn(x)[0]


class WithSort(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.sort(x, dim=1).values)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else self.fc(-x)


class RawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * self.scale


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.fc(x))


@pytest.mark.parametrize("model,shape,error,match", [
    ([nn.Linear(2, 2)], (2,), TypeError, "model: expected an nn.Module, got list"),
    ("mlp", (2,), TypeError, "model: expected an nn.Module, got str"),
    (WithLSTM(), (3, 8), ValueError, "model: unsupported module 'rnn' \\(LSTM\\)"),
    (WithSort(), (8,), ValueError, "model: unsupported operation .*sort"),
    (DataDependent(), (8,), ValueError, "model: torch.fx cannot trace"),
    (RawParameter(), (8,), ValueError, "model: unsupported operation get_attr"),
    (Shared(), (8,), ValueError, "model: module 'fc' is called more than once"),
    (build_model("mlp", 10, (1, 8, 8)), (1, 4, 4), ValueError, "input_shape: MLP cannot run"),
    (Tiny(), (), ValueError, "input_shape: expected positive sizes"),
    (Tiny(), "abc", ValueError, "input_shape: expected a sequence of positive ints"),
])
def test_bad_inputs_raise_naming_the_argument(model, shape, error, match):
    with pytest.raises(error, match=match):
        extract_graph(model, shape)


class TwoBranches(nn.Module):
    """Two convs on the input, concatenated along the channels, then a 1x1 conv: a concat node."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 3, 1)
        self.mix = nn.Conv2d(5, 4, 1)

    def forward(self, x):
        return self.mix(torch.cat([self.a(x), self.b(x)], dim=1)).mean((2, 3))


def test_concatenation_is_a_concat_node_with_both_branches():
    g = extract_graph(TwoBranches(), (1, 6, 6))
    assert [(n.name, n.op) for n in g.nodes] == [("x", "input"), ("a", "conv"), ("b", "conv"), ("cat", "concat"),
                                                 ("mix", "conv"), ("mean", "avg_pool")]
    assert list(g.edges) == [(0, 1), (0, 2), (1, 3), (2, 3), (3, 4), (4, 5)]
    assert g.nodes[3].out_shape == (5, 6, 6)
