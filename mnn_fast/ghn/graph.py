"""An architecture as a directed graph of operations, read from an ``nn.Module`` with torch.fx.

``extract_graph(model, input_shape)`` traces ``model`` symbolically (``torch.fx.symbolic_trace``) and
runs the traced graph once on zeros of ``[2, *input_shape]`` (``ShapeProp``, in eval mode so no
BatchNorm statistic changes) to learn every activation's shape. Each tensor operation becomes a
``Node`` (its type from ``OP_TYPES``, its activation shape, and for conv/linear/BatchNorm the module
whose parameters the GHN must predict); edges follow the data flow. Identity and dropout are
transparent. Anything else raises ``ValueError`` naming the argument.

Why torch.fx and not forward hooks: hooks only see module calls, so functional operations (``F.relu``,
the residual ``out + shortcut``, ``torch.flatten``, ResNet's slicing shortcut) and the wiring between
them would be invisible; fx records every operation and its exact inputs. Its limit: data-dependent
Python control flow cannot be traced (such a model is refused with a ``ValueError``).

Virtual edges (GHN-2): ``u -> v`` for every pair whose shortest directed path has length ``2..s``.
"""
from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OP_TYPES", "SHAPE_FEATURES", "Node", "ArchGraph", "extract_graph"]

OP_TYPES = ("input", "conv", "linear", "bn", "relu", "gelu", "tanh", "sigmoid", "max_pool", "avg_pool",
            "sum", "concat", "flatten", "slice", "pad")
SHAPE_FEATURES = 6  # log2 out, log2 in, kh, kw (of the weight), log2 channels, log2 height (of the output)

_MODULE_OPS = ((nn.Conv2d, "conv"), (nn.Linear, "linear"), ((nn.BatchNorm1d, nn.BatchNorm2d), "bn"),
               (nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"),
               (nn.MaxPool2d, "max_pool"), ((nn.AvgPool2d, nn.AdaptiveAvgPool2d), "avg_pool"),
               (nn.Flatten, "flatten"))
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout)
_FUNCTION_OPS = {operator.add: "sum", torch.add: "sum", torch.cat: "concat", torch.concat: "concat",
                 F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", torch.tanh: "tanh", torch.sigmoid: "sigmoid",
                 F.max_pool2d: "max_pool", F.avg_pool2d: "avg_pool", F.adaptive_avg_pool2d: "avg_pool",
                 torch.flatten: "flatten", operator.getitem: "slice", F.pad: "pad"}
_METHOD_OPS = {"add": "sum", "relu": "relu", "view": "flatten", "reshape": "flatten", "flatten": "flatten",
               "mean": "avg_pool"}
_TRANSPARENT = {F.dropout, "contiguous"}
_SHAPE_QUERIES = {"size", "dim"}  # integer-valued: not part of the data flow


@dataclass(frozen=True)
class Node:
    """One operation. ``module``: the qualified name of the module holding its parameters (``None``
    when it has none); ``params``: ``(name, shape)`` of those parameters (e.g. ``(("weight", (16, 1, 3, 3)),)``);
    ``out_shape``: the activation shape without the batch dimension. Hashable (graphs are cache keys)."""

    name: str
    op: str
    out_shape: tuple[int, ...]
    module: str | None = None
    params: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def shape_features(self) -> list[float]:
        """``SHAPE_FEATURES`` floats of order 1: log2 sizes / 8 and kernel sizes / 4; zeros where absent."""
        w = dict(self.params).get("weight", ())
        out_ch, in_ch = (w[0], w[1] if len(w) > 1 else 0) if w else (0, 0)
        kh, kw = (w[2], w[3]) if len(w) == 4 else ((1, 1) if len(w) == 2 else (0, 0))
        s = self.out_shape
        channels, height = (s[0], s[1]) if len(s) >= 2 else (math.prod(s), 1)
        return [math.log2(1 + out_ch) / 8, math.log2(1 + in_ch) / 8, kh / 4, kw / 4,
                math.log2(1 + channels) / 8, math.log2(1 + height) / 8]


@dataclass(frozen=True)
class ArchGraph:
    """``nodes`` in topological order (the order of the traced forward); ``edges``: ``(src, dst)``
    node indices of the data flow, sorted, without duplicates."""

    nodes: tuple[Node, ...]
    edges: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.nodes)

    def inputs_of(self, i: int) -> list[int]:
        return [u for u, v in self.edges if v == i]

    def distances(self, max_distance: int) -> dict[tuple[int, int], int]:
        """``{(u, v): d}``: the shortest directed path ``u -> v`` has ``d`` edges, ``1 <= d <= max_distance``."""
        succ: list[list[int]] = [[] for _ in self.nodes]
        for u, v in self.edges:
            succ[u].append(v)
        out = {}
        for start in range(len(self.nodes)):  # breadth-first search from each node, cut at max_distance
            seen = {start: 0}
            queue = deque([start])
            while queue:
                u = queue.popleft()
                if seen[u] == max_distance:
                    continue
                for v in succ[u]:
                    if v not in seen:
                        seen[v] = seen[u] + 1
                        out[(start, v)] = seen[v]
                        queue.append(v)
        return out

    def virtual_edges(self, max_distance: int) -> list[tuple[int, int, int]]:
        """``(u, v, d)`` for every pair at shortest-path distance ``2 <= d <= max_distance``, sorted."""
        return sorted((u, v, d) for (u, v), d in self.distances(max_distance).items() if d >= 2)

    def param_names(self) -> list[str]:
        """The model's parameter names the graph covers (``"<module>.<param>"``), in node order."""
        return [f"{n.module}.{p}" for n in self.nodes if n.module is not None for p, _ in n.params]


def extract_graph(model: nn.Module, input_shape) -> ArchGraph:
    """The operation graph of ``model`` for inputs ``Tensor[B, *input_shape] float32``.

    Raises ``TypeError`` if ``model`` is not an ``nn.Module``; ``ValueError`` naming ``model`` for an
    operation outside ``OP_TYPES`` (or a parameter no supported module holds, or a module called twice),
    and naming ``input_shape`` if the model cannot run on that shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(f"input_shape: expected a sequence of positive ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape: expected positive sizes, got {input_shape!r}")
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError... for untraceable code
        raise ValueError(f"model: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e})") from e
    was_training = model.training
    model.eval()  # eval: the shape pass must not move BatchNorm running statistics
    try:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            p = next(model.parameters(), None)  # run where the model lives
            ShapeProp(gm).propagate(torch.zeros(2, *shape, device=p.device if p is not None else "cpu",
                                                dtype=p.dtype if p is not None and p.is_floating_point() else None))
    except Exception as e:
        raise ValueError(f"input_shape: {type(model).__name__} cannot run on inputs of shape {shape} "
                         f"({type(e).__name__}: {e})") from e
    finally:
        model.train(was_training)
    return _to_graph(gm, model)


def _to_graph(gm: torch.fx.GraphModule, model: nn.Module) -> ArchGraph:
    nodes: list[Node] = []
    edges: set[tuple[int, int]] = set()
    index: dict[str, int | tuple[int, ...]] = {}  # fx node name -> our node (transparent: its inputs' nodes)
    used_modules: set[str] = set()
    for fx_node in gm.graph.nodes:
        if fx_node.op == "output":
            continue
        meta = fx_node.meta.get("tensor_meta")
        is_tensor = isinstance(meta, torch.fx.passes.shape_prop.TensorMetadata)
        op, module = _classify(fx_node, gm)
        if op in ("shape_query", "slice") and not is_tensor:  # e.g. x.shape[0] in a view: no data flow
            continue
        sources = sorted({j for a in fx_node.all_input_nodes for j in _as_tuple(index.get(a.name, ()))})
        if op == "transparent":
            index[fx_node.name] = tuple(sources)
            continue
        if not is_tensor or op == "shape_query":
            raise ValueError(f"model: unsupported operation {fx_node.format_node()} (its output is not one tensor)")
        params = ()
        if module is not None:
            if module in used_modules:
                raise ValueError(f"model: module {module!r} is called more than once; shared parameters "
                                 "are not supported")
            used_modules.add(module)
            params = tuple((k, tuple(p.shape)) for k, p in gm.get_submodule(module).named_parameters(recurse=False))
        index[fx_node.name] = len(nodes)
        name = module if module is not None else fx_node.name
        nodes.append(Node(name, op, tuple(int(s) for s in meta.shape[1:]), module if params else None, params))
        edges.update((j, len(nodes) - 1) for j in sources)
    graph = ArchGraph(tuple(nodes), tuple(sorted(edges)))
    covered = set(graph.param_names())
    missed = [k for k, _ in model.named_parameters() if k not in covered]
    if missed:
        raise ValueError(f"model: parameters {missed[:4]} are not held by a supported module "
                         f"(conv, linear, BatchNorm) called in forward")
    return graph


def _as_tuple(x) -> tuple[int, ...]:
    return x if isinstance(x, tuple) else (x,)


def _classify(fx_node, gm) -> tuple[str, str | None]:
    """``(op type, module name or None)``; pseudo-types "transparent" and "shape_query"."""
    kind, target = fx_node.op, fx_node.target
    if kind == "placeholder":
        return "input", None
    if kind == "call_module":
        mod = gm.get_submodule(target)
        if isinstance(mod, _TRANSPARENT_MODULES):
            return "transparent", None
        for types, op in _MODULE_OPS:
            if isinstance(mod, types):
                if op == "conv" and mod.padding_mode != "zeros":
                    break
                return op, target
        raise ValueError(f"model: unsupported module {target!r} ({type(mod).__name__}); supported: "
                         f"{', '.join(sorted({t.__name__ for ts, _ in _MODULE_OPS for t in _as_types(ts)}))}")
    if kind == "call_function":
        if target in _TRANSPARENT:
            return "transparent", None
        if target in _FUNCTION_OPS:
            return _FUNCTION_OPS[target], None
        if target is getattr and fx_node.args[1] == "shape":
            return "shape_query", None
    if kind == "call_method":
        if target in _TRANSPARENT:
            return "transparent", None
        if target in _METHOD_OPS:
            return _METHOD_OPS[target], None
        if target in _SHAPE_QUERIES:
            return "shape_query", None
    name = getattr(target, "__name__", target)
    raise ValueError(f"model: unsupported operation {kind} {name!r} (node {fx_node.name!r}); the graph "
                     f"vocabulary is {OP_TYPES}")


def _as_types(t):
    return t if isinstance(t, tuple) else (t,)
