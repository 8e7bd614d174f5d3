"""GHN-2 style graph hypernetwork: operation graphs in, every conv/linear/BatchNorm parameter out.

1. Embed: ``h_v = E[op type of v] + Linear(shape features of v)`` (``graph.Node.shape_features``).
2. Propagate (gated GNN, GHN-2): visit the nodes in topological order, then in reverse; each node
   takes the mean of messages from its predecessors (successors on the way back), ``MLP(h_u)`` along
   real edges and ``MLP_sp(h_u) / d`` along virtual edges of shortest-path length ``2 <= d <= s``,
   and updates ``h_v <- GRUCell(message, h_v)``. Nodes at the same depth (longest path from the
   inputs, or to the outputs) are independent, so each depth level of the whole meta-batch is one
   batched update.
3. Decode: ``MLP(LayerNorm(h_v))`` is a tile ``[out_tile, in_tile, k, k]``, fitted to the target weight shape:
   spatially centre-cropped (smaller kernels) or bilinearly resized (larger); along the channels
   repeated and sliced. Output-channel block ``b >= 1`` is ``sqrt(1 - a^2) T + a roll(T, b)`` (the tile
   mixed with itself rolled by ``b`` input channels, ``a = REPEAT_MIX``): exact copies, with copied
   outgoing weights, would stay identical under every gradient step of fine-tuning, while fully
   rolled blocks lose what the tile learned (on digits, wider nets: 0.17 test accuracy before
   fine-tuning rolled, 0.34 copied, 0.33 mixed). A linear weight reads the tile as ``[out_tile, in_tile*k*k]``.
4. Parameter normalisation (GHN-2): the fitted weight is scaled by ``sqrt(gain / fan_in)``, the
   variance of He init (gain 2 for conv, 1 for linear) if the decoder's outputs have unit variance;
   conv/linear biases are ``bias_head(h_v) / sqrt(fan_in)``; BatchNorm weight and bias are ``1 + a``
   and ``b`` with ``(a, b)`` from ``norm_head(h_v)``. Both heads start at zero, so training starts from
   the usual 0 biases and BatchNorm 1/0. Running statistics are buffers and are not predicted.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .graph import OP_TYPES, SHAPE_FEATURES, ArchGraph

__all__ = ["GHN", "HYPERPARAMETERS", "fit_tile", "predict_parameters", "assign_parameters"]

REPEAT_MIX = 0.3  # weight of the rolled tile in repeated output-channel blocks (symmetry breaking)
HYPERPARAMETERS = ("hidden", "virtual_distance", "tile", "decoder_hidden", "rounds")  # GHN's arguments
_WEIGHT_GAIN = {"conv": 2.0, "linear": 1.0}


class GHN(nn.Module):
    """Graph hypernetwork. ``ghn(graphs)`` -> one ``{parameter name: Tensor float32}`` per graph,
    every parameter of the graph's model with exactly its shape, differentiable w.r.t. the GHN.

    Args:
        hidden: node embedding size.
        virtual_distance: ``s``, the longest shortest-path that gets a virtual edge (1 = none).
        tile: ``(out_tile, in_tile, k, k)`` of the decoder's output.
        decoder_hidden: width of the decoder MLP's hidden layer.
        rounds: forward+backward propagation passes.
    """

    def __init__(self, hidden: int = 32, virtual_distance: int = 5, tile=(32, 32, 3, 3), decoder_hidden: int = 64,
                 rounds: int = 1):
        super().__init__()
        for name, value in (("hidden", hidden), ("virtual_distance", virtual_distance),
                            ("decoder_hidden", decoder_hidden), ("rounds", rounds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        tile = tuple(tile)
        if len(tile) != 4 or not all(isinstance(t, int) and t >= 1 for t in tile) or tile[2] != tile[3]:
            raise ValueError(f"tile: expected (out_tile, in_tile, k, k) positive ints, got {tile!r}")
        self.hidden, self.virtual_distance, self.tile = hidden, virtual_distance, tile
        self.decoder_hidden, self.rounds = decoder_hidden, rounds
        self.op_embedding = nn.Embedding(len(OP_TYPES), hidden)
        self.shape_encoder = nn.Linear(SHAPE_FEATURES, hidden)
        self.message = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.virtual_message = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.gru = nn.GRUCell(hidden, hidden)
        self.decoder = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, decoder_hidden), nn.ReLU(),
                                     nn.Linear(decoder_hidden, math.prod(tile)))
        # Raw tiles of about unit variance at the start (unit-variance LayerNorm output, hidden
        # pre-activations of variance 1/3, so E[relu^2] = 1/6), so the fan-in scaling starts at He's variance.
        nn.init.normal_(self.decoder[3].weight, std=math.sqrt(6.0 / decoder_hidden))
        self.bias_head = nn.Linear(hidden, tile[0])
        self.norm_head = nn.Linear(hidden, 2 * tile[0])
        for head in (self.bias_head, self.norm_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def hyperparameters(self) -> dict:
        """The constructor's arguments (JSON-able): ``GHN(**ghn.hyperparameters())`` rebuilds the architecture."""
        return dict(hidden=self.hidden, virtual_distance=self.virtual_distance, tile=list(self.tile),
                    decoder_hidden=self.decoder_hidden, rounds=self.rounds)

    def embed(self, graphs: Sequence[ArchGraph]) -> Tensor:
        """Node embeddings after propagation, ``Tensor[total nodes, hidden] float32`` (graphs concatenated)."""
        dev = self.op_embedding.weight.device
        tables = [_graph_tables(g, self.virtual_distance) for g in graphs]
        ops = torch.cat([t["ops"] for t in tables]).to(dev)
        h = self.op_embedding(ops) + self.shape_encoder(torch.cat([t["features"] for t in tables]).to(dev))
        forward, backward = (_schedule(tables, direction, dev) for direction in ("forward", "backward"))
        for _ in range(self.rounds):
            h = self._propagate(h, forward)
            h = self._propagate(h, backward)
        return h

    def _propagate(self, h: Tensor, schedule) -> Tensor:
        for idx, inv_count, src_r, dst_r, src_v, dst_v, inv_d in schedule:
            m = h.new_zeros(len(idx), self.hidden)
            if len(src_r):
                m = m.index_add(0, dst_r, self.message(h[src_r]))
            if len(src_v):
                m = m.index_add(0, dst_v, self.virtual_message(h[src_v]) * inv_d[:, None])
            # out of place: the earlier levels' embeddings stay in the autograd graph
            h = h.index_copy(0, idx, self.gru(m * inv_count[:, None], h[idx]))
        return h

    def forward(self, graphs: Sequence[ArchGraph]) -> list[dict[str, Tensor]]:
        if isinstance(graphs, ArchGraph):
            raise TypeError("graphs: expected a sequence of ArchGraph, got a single ArchGraph (wrap it in a list)")
        graphs = list(graphs)
        if not all(isinstance(g, ArchGraph) for g in graphs):
            raise TypeError("graphs: expected a sequence of ArchGraph (mnn_fast.ghn.extract_graph)")
        if not graphs:
            return []
        h = self.embed(graphs)
        jobs = []  # (graph index, node, row of h)
        row = 0
        for gi, g in enumerate(graphs):
            jobs += [(gi, node, row + i) for i, node in enumerate(g.nodes) if node.params]
            row += len(g)
        out: list[dict[str, Tensor]] = [{} for _ in graphs]
        weighted = [j for j in jobs if j[1].op in _WEIGHT_GAIN]
        norms = [j for j in jobs if j[1].op == "bn"]
        if weighted:
            rows = torch.tensor([r for _, _, r in weighted], device=h.device)
            tiles = self.decoder(h[rows]).view(len(weighted), *self.tile)
            biases = self.bias_head(h[rows])
            for (gi, node, _), t, b in zip(weighted, tiles, biases):
                shapes = dict(node.params)
                w_shape = shapes["weight"]
                fan_in = math.prod(w_shape[1:])
                w = fit_tile(t, w_shape)
                out[gi][f"{node.module}.weight"] = w * math.sqrt(_WEIGHT_GAIN[node.op] / fan_in)
                if "bias" in shapes:
                    out[gi][f"{node.module}.bias"] = _fit_vector(b, shapes["bias"][0]) / math.sqrt(fan_in)
        if norms:
            rows = torch.tensor([r for _, _, r in norms], device=h.device)
            ab = self.norm_head(h[rows]).view(len(norms), 2, self.tile[0])
            for (gi, node, _), (a, b) in zip(norms, ab):
                shapes = dict(node.params)
                out[gi][f"{node.module}.weight"] = 1.0 + _fit_vector(a, shapes["weight"][0])
                out[gi][f"{node.module}.bias"] = _fit_vector(b, shapes["bias"][0])
        return out


def fit_tile(tile: Tensor, shape) -> Tensor:
    """``tile: Tensor[To, Ti, k, k]`` -> ``Tensor[shape]`` for ``shape = (O, I, kh, kw)`` or ``(O, I)``.

    Spatial: centre crop if ``kh, kw <= k``, else bilinear resize. Channels: output block ``b >= 1``
    (rows ``b*To ..``) is ``sqrt(1 - a^2) tile + a roll(tile, b)`` along the input channels, ``a =
    REPEAT_MIX`` (same variance, no two blocks equal); then the input axis repeats.
    """
    to, ti, k, _ = tile.shape
    if len(shape) == 2:
        return fit_tile(tile.reshape(to, -1, 1, 1), (*shape, 1, 1)).reshape(shape)
    o, i, kh, kw = shape
    if kh <= k and kw <= k:
        r, c = (k - kh) // 2, (k - kw) // 2
        tile = tile[:, :, r:r + kh, c:c + kw]
    else:
        tile = F.interpolate(tile, size=(kh, kw), mode="bilinear", align_corners=True)
    keep = math.sqrt(1.0 - REPEAT_MIX ** 2)
    rows = torch.cat([keep * tile + REPEAT_MIX * torch.roll(tile, shifts=b, dims=1) if b else tile
                      for b in range(-(-o // to))])
    return rows[:o].repeat(1, -(-i // tile.shape[1]), 1, 1)[:, :i].contiguous()


def _fit_vector(v: Tensor, n: int) -> Tensor:
    return v.repeat(-(-n // len(v)))[:n]


@functools.lru_cache(maxsize=8192)
def _graph_tables(graph: ArchGraph, max_distance: int) -> dict:
    """Per graph (cached: the training pool's graphs recur every step): op ids, shape features, the
    edges with their shortest-path lengths, and each node's depth level in both directions."""
    n = len(graph)
    dist = graph.distances(max_distance)
    preds: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    for u, v in graph.edges:
        preds[v].append(u)
        succs[u].append(v)
    level_f = [0] * n
    for v in range(n):  # nodes are topologically ordered
        level_f[v] = max((level_f[u] + 1 for u in preds[v]), default=0)
    level_b = [0] * n
    for u in reversed(range(n)):
        level_b[u] = max((level_b[v] + 1 for v in succs[u]), default=0)
    edges = sorted((u, v, d) for (u, v), d in dist.items())
    return {"ops": torch.tensor([OP_TYPES.index(node.op) for node in graph.nodes]),
            "features": torch.tensor([node.shape_features() for node in graph.nodes], dtype=torch.float32),
            "edges": torch.tensor(edges, dtype=torch.long).view(-1, 3),
            "level_forward": torch.tensor(level_f), "level_backward": torch.tensor(level_b)}


def _schedule(tables: list[dict], direction: str, device) -> list[tuple[Tensor, ...]]:
    """Per depth level of the concatenated graphs, in visiting order: ``(nodes, 1 / incoming edge count
    (count >= 1), real-edge sources, their targets as positions in nodes, virtual-edge sources, their
    targets, 1 / their distances)``; all ``Tensor[*]`` on ``device``."""
    sizes = [len(t["ops"]) for t in tables]
    offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
    level = torch.cat([t[f"level_{direction}"] for t in tables])
    edges = torch.cat([t["edges"] + torch.tensor([o, o, 0]) for t, o in zip(tables, offsets.tolist())])
    src, dst = (edges[:, 0], edges[:, 1]) if direction == "forward" else (edges[:, 1], edges[:, 0])
    dist = edges[:, 2]
    n, n_levels = len(level), int(level.max()) + 1
    order = torch.sort(level, stable=True).indices  # by level, then node index
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(level, minlength=n_levels).cumsum(0)])
    pos = torch.empty(n, dtype=torch.long)
    pos[order] = torch.arange(n) - starts[level[order]]  # a node's position within its level
    inv_count = 1.0 / torch.bincount(dst, minlength=n).clamp(min=1).float()
    key = level[dst] * 2 + (dist > 1).long()  # edges grouped by target level, real before virtual
    e_order = torch.sort(key, stable=True).indices
    bounds = [0] + torch.bincount(key, minlength=2 * n_levels).cumsum(0).tolist()
    src, dst_pos, inv_d = src[e_order], pos[dst][e_order], 1.0 / dist[e_order].float()
    out = []
    for lvl in range(n_levels):
        idx = order[starts[lvl]:starts[lvl + 1]]
        r0, r1, v1 = bounds[2 * lvl], bounds[2 * lvl + 1], bounds[2 * lvl + 2]
        level_tensors = (idx, inv_count[idx], src[r0:r1], dst_pos[r0:r1], src[r1:v1], dst_pos[r1:v1], inv_d[r1:v1])
        out.append(tuple(t.to(device) for t in level_tensors))
    return out


def predict_parameters(ghn: GHN, model: nn.Module, input_shape) -> dict[str, Tensor]:
    """``{name: Tensor}`` for every parameter of ``model`` (inputs ``[B, *input_shape]``), from ``ghn``."""
    from .graph import extract_graph

    return ghn([extract_graph(model, input_shape)])[0]


@torch.no_grad()
def assign_parameters(model: nn.Module, params: dict[str, Tensor]) -> nn.Module:
    """Copies ``params`` (detached) into ``model``'s parameters in place; every parameter must be given
    with its exact shape (``ValueError`` otherwise). Returns ``model``."""
    own = dict(model.named_parameters())
    if set(own) != set(params) or any(own[k].shape != params[k].shape for k in own):
        raise ValueError(f"params: expected exactly {type(model).__name__}'s parameters and shapes "
                         f"(missing {sorted(set(own) - set(params))[:3]}, extra {sorted(set(params) - set(own))[:3]})")
    for k, p in own.items():
        p.copy_(params[k])
    return model
