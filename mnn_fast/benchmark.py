"""Routing-core workloads shared by ``bench/`` and ``mnn-fast bench``: naive loop vs the engine's ops.

The naive core is the paper's loop with the experts taken out (mask, index, gather, add per
expert); the engine core is route + gather (into a reused workspace) + combine of one backend; ``copy_core`` clones the
same number of bytes, to read the others as a fraction of this machine's copy bandwidth.
"""
from __future__ import annotations

import time

import torch

from .engine import stages
from .engine.backends import get_backend
from .engine.torch_ops import segment_linear_grouped_mm

THRESHOLD = 0.25


def make_workload(batch: int, experts: int, width: int, seed: int = 0) -> dict:
    """Scores with two hot experts per sample (the MNN regime: ~2 of E active at t=0.25), C = E."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, experts, generator=gen) * (0.2 / experts)
    hot = torch.randint(0, experts, (batch, 2), generator=gen)
    scores.scatter_(1, hot, 0.3 + 0.2 * torch.rand(batch, 2, generator=gen))
    x = torch.randn(batch, width, generator=gen)
    logp = torch.log_softmax(torch.randn(batch, experts, generator=gen), 1)
    routing = get_backend("torch").route(scores, THRESHOLD, 0)
    rows = routing.perm.numel()
    logv = torch.randn(rows, experts, generator=gen)
    offsets = routing.offsets.tolist()
    per_expert = [logv[offsets[e] : offsets[e + 1]] for e in range(experts)]
    moved = (
        batch * experts * 4  # scores read
        + (experts * 2 + batch + 2 * rows) * 8  # routing written
        + 2 * rows * width * 4  # gather read + write
        + (2 * batch * experts + rows * experts) * 4 + (rows + batch) * 8  # combine
    )
    return dict(scores=scores, x=x, logp=logp, logv=logv, per_expert=per_expert, rows=rows, bytes=moved,
                copy_src=torch.empty(max(1, moved // 8), dtype=torch.float32).fill_(1.0))


def naive_core(w):
    acc = w["logp"].clone()
    for e, logv_e in enumerate(w["per_expert"]):
        idx = (w["scores"][:, e] > THRESHOLD).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        w["x"][idx]  # the gather the naive loop does for expert e
        acc[idx] = acc[idx] + logv_e
    return acc


def engine_core(name):
    """The engine's routing core on backend ``name``: route, gather (into a workspace kept across
    calls, as ``MetaNeuralNetwork`` does in inference, so a large buffer's first-touch page faults are
    paid once), combine."""
    ops = get_backend(name)
    workspace: dict[str, torch.Tensor] = {}

    def run(w):
        r = ops.route(w["scores"], THRESHOLD, 0)
        need = r.perm.numel() * w["x"].shape[1]
        if "x" not in workspace or workspace["x"].numel() < need:
            workspace["x"] = torch.empty(need, dtype=w["x"].dtype)
        stages.gather_rows(w["x"], r.perm, ops, workspace["x"])
        return ops.combine(w["logp"], w["logv"], r.perm, r.sample_offsets, r.sample_rows)

    return run


def copy_core(w):
    return w["copy_src"].clone()



def best_time(fn, *args, repeats: int = 5) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up, in seconds."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


# ------------------------------------------------------------------------------ end to end

def end_to_end_workload(model: str, experts: int, batch: int, active_per_sample: float = 2.0,
                        width: int = 512, seed: int = 0) -> dict:
    """A switch, ``experts`` specialists (one per class, ``C = E``) and inputs, freshly initialised.

    ``model``: ``"mlp"`` (``width -> 64 -> C`` MLPs on ``Tensor[B, width]``), ``"resnet20"`` or
    ``"mobilenet_v2"`` (``E = C = 10`` on ``Tensor[B, 3, 32, 32]``). Untrained switches spread their
    probability evenly, so the threshold is set to the score quantile that activates
    ``active_per_sample`` experts per sample on average: the routing load a trained MNN would see.
    """
    from torch import nn

    from .groups.heads import find_classifier
    from .training.models import build_model

    torch.manual_seed(seed)
    if model == "mlp":
        def net():
            return nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, experts)).eval()
        x = torch.randn(batch, width)
    else:
        if experts != 10:
            raise ValueError(f"experts: {model} workloads are CIFAR-sized with 10 classes, got {experts}")
        def net():
            return build_model(model, 10, (3, 32, 32)).eval()
        x = torch.randn(batch, 3, 32, 32)
    switch, specialists = net(), [net() for _ in range(experts)]
    with torch.no_grad():
        _, classifier = find_classifier(switch)
        # Untrained switches are nearly constant (MobileNetV2's logits are ~1e-9 at init, so every
        # score is 1/C and no quantile separates them) and favour a class or two for every input.
        # Rescale the classifier to logits of spread 2 and centre each class over the batch, so
        # routing is confident and spread over the experts, as a trained switch's is.
        z = switch(x).float()
        centre = z.mean(0)
        spread = float((z - centre).std()) if batch > 1 else 0.0  # after centring: what routing sees
        if spread > 0 and classifier.bias is not None:
            scale = 2.0 / spread
            classifier.weight.mul_(scale)
            classifier.bias.sub_(centre).mul_(scale)
        scores = torch.softmax(switch(x).float(), 1).flatten()
    k = max(1, min(scores.numel(), int(round(active_per_sample * batch))))
    # Midway between the k-th and (k+1)-th largest score: no sample sits on the threshold, where a
    # compiled softmax rounding one ulp apart would route it differently from eager.
    top = torch.topk(scores, k + 1).values if k < scores.numel() else None
    threshold = float((top[-2] + top[-1]) / 2) if top is not None else 0.0
    return dict(model=model, switch=switch, specialists=specialists, x=x, threshold=threshold, batch=batch, experts=experts)


def peak_rss_growth(fn) -> int:
    """Bytes by which one call of ``fn`` raises the process's peak resident memory above its current
    resident memory (Linux ``VmHWM``, reset first); ``-1`` where ``/proc`` does not offer it."""
    def status_kb(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(field)

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_kb("VmRSS")
        fn()
        return max(0, status_kb("VmHWM") - before) * 1024
    except OSError:
        return -1


# ------------------------------------------------------------------------------ grouped-GEMM peers

def padded_bmm_segment_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              offsets: torch.Tensor, parallel: bool = False) -> torch.Tensor:
    """``segment_linear`` as one ``baddbmm`` over every expert's rows padded to the largest count
    (shapes as :func:`~mnn_fast.engine.torch_ops.segment_linear_grouped_mm`): the batched-GEMM peer,
    for the benchmarks only."""
    counts = offsets.diff()
    n, experts = x.shape[0], weight.shape[0]
    longest = int(counts.max()) if n else 0
    expert = torch.repeat_interleave(torch.arange(experts), counts, output_size=n)
    slot = torch.arange(n) - offsets[expert]
    padded = x.new_zeros(experts, longest, x.shape[1])
    padded[expert, slot] = x
    if bias is None:
        out = torch.bmm(padded, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), padded, weight.transpose(1, 2))
    return out[expert, slot]


# The grouped_mm peer is the op the GPU backends use for bfloat16; on CPU F.grouped_mm is a loop of mm.
PEERS = {"peer_grouped_mm": segment_linear_grouped_mm, "peer_padded_bmm": padded_bmm_segment_linear}


def end_to_end_impls(w: dict, executors=("sequential", "grouped", "grouped_parallel"), peers: bool = True) -> dict:
    """Name -> zero-argument callable, all on ``w``'s inputs: the naive loop, the engine per executor,
    dense (every expert on every sample), the compute floor (switch + experts on pre-gathered rows)
    and, for Linear-stack experts with ``peers``, the grouped executor with its GEMM replaced by
    each of :data:`PEERS`."""
    import dataclasses

    from .engine.contributions import expert_log_contribution
    from .engine.executors import linear_stack_reason
    from .engine.module import MetaNeuralNetwork
    from .reference import naive_forward

    switch, specialists, x, t = w["switch"], w["specialists"], w["x"], w["threshold"]
    impls = {"naive": lambda: naive_forward(switch, specialists, x, threshold=t)}
    for name in executors:
        try:
            mnn = MetaNeuralNetwork(switch, specialists, threshold=t, executor=name)
        except ValueError:  # grouped_parallel needs Linear stacks and the C++ segment_linear
            continue
        impls[f"engine_{name}"] = lambda mnn=mnn: mnn(x)
        if name == "grouped" and peers and linear_stack_reason(specialists, mnn.ops) is None:
            for peer, fn in PEERS.items():
                backend = dataclasses.replace(mnn.ops, name=peer, segment_linear=fn, segment_linear_gather=None)
                other = MetaNeuralNetwork(switch, specialists, threshold=t, executor="grouped", backend=backend)
                impls[peer] = lambda other=other: other(x)
    engine = MetaNeuralNetwork(switch, specialists, threshold=t, executor="sequential")
    with torch.no_grad():
        _, routing = engine(x, return_routing=True)
        chunks = [c.clone() for c in torch.split(x[routing.perm], routing.counts.tolist())]
    w["rows"] = int(routing.perm.numel())

    def floor():
        switch(x)
        return [s(c) for s, c in zip(specialists, chunks) if c.shape[0]]

    def dense():
        acc = torch.log_softmax(switch(x).float(), 1)
        for e, s in enumerate(specialists):
            acc = acc + expert_log_contribution(s(x), [e], len(specialists))
        return torch.log_softmax(acc, 1)

    impls.update(floor=floor, dense=dense)
    return impls
