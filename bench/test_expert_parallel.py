"""Expert-parallel over 2 processes against the module and the naive loop in one process, same rows, one run.

E MLP specialists (64 -> 64 -> C, C = E) from ``end_to_end_workload("mlp", E, 2B, width=64)``, two
experts per sample. (a) the module in 1 process at 2 threads on all 2B rows, and at 1 thread (which
an oversubscribed machine does not distort); (b) ExpertParallel in 2 gloo processes at 1 thread each,
each on its own B rows; (c) ``naive_forward`` on the 2B rows at 1 thread. Rounds interleave them;
outputs are checked bitwise first (each rank against the module on its own rows).
"""
from __future__ import annotations

import datetime
import gc
import multiprocessing
import socket
import statistics
import time

import torch
import torch.distributed as dist

from conftest import is_quick
from mnn_fast import MetaNeuralNetwork
from mnn_fast.benchmark import end_to_end_workload
from mnn_fast.reference import naive_forward

TABLE = "expert_parallel"
WIDTH = 64  # input features, and the hidden width of every MLP
FULL, QUICK = (1000, 4096, 3), (100, 512, 3)  # E, B rows per rank, rounds
WAIT = 900  # seconds a rank may take to build its model and answer a round: past it the run fails


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: VmHWM (peak RSS) restarts from the current RSS
    except OSError:
        pass


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def rank_worker(rank: int, port: int, experts: int, batch: int, commands, replies) -> None:
    """One expert-parallel rank: builds the seeded workload, keeps its experts, checks its output
    bitwise against the module on its rows, then runs one timed forward per command."""
    from mnn_fast.distributed import ExpertParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=WAIT))
    base = _status_kb("VmRSS") * 1024  # Python, torch and the group, before any model
    w = end_to_end_workload("mlp", experts, 2 * batch, width=WIDTH)
    mnn = MetaNeuralNetwork(w["switch"], w["specialists"], threshold=w["threshold"]).eval()
    x = w["x"][rank * batch:(rank + 1) * batch].clone()
    with torch.no_grad():
        want = mnn(x)
        ep = ExpertParallel.from_module(mnn)
        del mnn, w
        gc.collect()  # the other rank's specialists go: what stays is this rank's share
        equal = torch.equal(ep(x), want)  # also the warm-up call
    # What failure detection adds per exchange: one store set ("call k, exchange s").
    # Median of 21 batches of 50: a shared machine preempts a batch now and then.
    store, batches = dist.group.WORLD.get_group_store(), []
    for _ in range(21):
        start = time.perf_counter()
        for i in range(50):
            store.set(f"bench/at/{rank}", f"{i} 0")
        batches.append((time.perf_counter() - start) / 50)
    set_seconds = statistics.median(batches)
    _reset_peak()
    ep.exchange_log = log = []
    replies.put(("ready", rank, equal, _param_bytes(ep), base, set_seconds))
    while commands.get() == "go":
        log.clear()
        start = time.perf_counter()
        with torch.no_grad():
            ep(x)
        took = time.perf_counter() - start
        replies.put(("round", rank, took, sum(e[1] for e in log), sum(e[2] for e in log)))
    replies.put(("done", rank, _status_kb("VmHWM") * 1024))
    dist.destroy_process_group()


def _get(replies, kind: str, count: int) -> list[tuple]:
    got = [replies.get(timeout=WAIT) for _ in range(count)]
    assert all(g[0] == kind for g in got), got
    return sorted(got, key=lambda g: g[1])  # by rank


def _fmt(rows):
    head = (f"{'setup':<40} | {'rows/s':>9} {'ms/call':>8} {'x naive':>7} | {'param MB':>8} {'peak MB':>8} | "
            f"{'sent MB':>7} {'a2a share':>9}")
    lines = [head, "-" * len(head)]
    naive = next(r["seconds"] for r in rows if r["setup"] == "naive loop")
    for r in rows:
        sent = f"{r['sent_bytes'] / 1e6:>7.2f}" if r.get("sent_bytes") is not None else f"{'-':>7}"
        share = f"{r['exchange_share']:>9.0%}" if r.get("exchange_share") is not None else f"{'-':>9}"
        lines.append(f"{r['setup'] + ', ' + r['layout']:<40} | {r['rows_per_s']:>9.0f} {r['seconds'] * 1e3:>8.1f} "
                     f"{naive / r['seconds']:>6.2f}x | {r['param_bytes'] / 1e6:>8.1f} {r['peak_rss'] / 1e6:>8.0f} | "
                     f"{sent} {share}")
    return lines


@torch.no_grad()
def test_expert_parallel(results, request):
    experts, batch, rounds = QUICK if is_quick(request.config) else FULL
    results.formatters[TABLE] = _fmt
    ctx = multiprocessing.get_context("spawn")
    commands, replies = [ctx.Queue() for _ in range(2)], ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=rank_worker, args=(r, port, experts, batch, commands[r], replies)) for r in range(2)]
    for p in procs:
        p.start()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        w = end_to_end_workload("mlp", experts, 2 * batch, width=WIDTH)
        mnn = MetaNeuralNetwork(w["switch"], w["specialists"], threshold=w["threshold"]).eval()
        x = w["x"]
        run = {"module": lambda: mnn(x),
               "naive loop": lambda: naive_forward(w["switch"], w["specialists"], x, threshold=w["threshold"])}
        assert torch.equal(run["module"](), run["naive loop"]())  # bitwise before timing (and the warm-up)
        ready = _get(replies, "ready", 2)
        assert all(r[2] for r in ready), f"a rank's ExpertParallel output differs from the module's: {ready}"
        _reset_peak()
        times = {"module": [], "module 1": [], "naive loop": [], "expert parallel": []}
        ranks = []  # per round: [(rank, seconds, exchange seconds, bytes sent)] for both ranks
        for _ in range(rounds):
            for name in ("module", "module 1", "expert parallel", "naive loop"):
                if name == "expert parallel":
                    for q in commands:
                        q.put("go")
                    ranks.append([g[1:] for g in _get(replies, "round", 2)])
                    # The slower rank's forward: the two run together, so it is the call's wall time.
                    times[name].append(max(r[1] for r in ranks[-1]))
                else:
                    torch.set_num_threads(2 if name == "module" else 1)
                    start = time.perf_counter()
                    run[name.split(" 1")[0]]()
                    times[name].append(time.perf_counter() - start)
        parent_peak = _status_kb("VmHWM") * 1024
        for q in commands:
            q.put("stop")
        done = _get(replies, "done", 2)
    finally:
        torch.set_num_threads(old)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    key = dict(E=experts, B=batch, width=WIDTH)
    full_params = _param_bytes(mnn)
    for name, layout in (("module", "1 process x 2 threads"), ("module 1", "1 process x 1 thread"),
                         ("naive loop", "1 process x 1 thread")):
        seconds = statistics.median(times[name])
        results.record(TABLE, {**key, "setup": name.split(" 1")[0], "layout": layout}, seconds=seconds, rows_per_s=2 * batch / seconds,
                       param_bytes=full_params, peak_rss=parent_peak, sent_bytes=None, exchange_share=None)
    seconds = statistics.median(times["expert parallel"])
    share = statistics.median(max(r[2] / r[1] for r in per_round) for per_round in ranks)
    results.record(TABLE, {**key, "setup": "expert parallel", "layout": "2 processes x 1 thread"}, seconds=seconds,
                   rows_per_s=2 * batch / seconds, param_bytes=max(r[3] for r in ready),
                   peak_rss=max(d[2] for d in done), sent_bytes=max(r[3] for per_round in ranks for r in per_round),
                   exchange_share=share, rank_param_bytes=[r[3] for r in ready], rank_peak_rss=[d[2] for d in done],
                   rank_base_rss=[r[4] for r in ready], detection_seconds_per_call=4 * max(r[5] for r in ready),
                   rank_sent_bytes=[max(per_round[k][3] for per_round in ranks) for k in range(2)],
                   routed_rows=int(mnn(x, return_routing=True)[1].counts.sum()))
    results.notes[TABLE] = [
        f"E={experts} MLP specialists {WIDTH}->{WIDTH}->{experts}, B={batch} rows per rank (2x{batch} in all), "
        f"median of {rounds} interleaved rounds; expert parallel: the slower rank's forward; sent: bytes one rank "
        f"sends the other per call (all four exchanges); a2a share: time inside the exchanges over the forward "
        f"(the slower rank); peak: peak RSS per process while timing (each rank's Python, torch and group alone: "
        f"{max(r[4] for r in ready) / 1e6:.0f} MB); failure detection adds 4 store sets per call, "
        f"{4e6 * max(r[5] for r in ready):.1f} us"]
