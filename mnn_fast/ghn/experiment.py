"""``mnn-fast ghn``: GHN-predicted vs random initialisation, before and after fine-tuning.

Per seed: the training split less a stratified 10% validation split; a pool of ``pool_size`` distinct
in-distribution CNNs (``sampler.SPACES``) on which a GHN trains for ``steps`` meta-batches. Held-out
architectures, none in the pool: ``val_archs`` per split to choose the fine-tuning learning rate, and
``archs_per_split`` other ones per split (in_distribution, deeper, wider) to test. Each net starts
from the GHN's prediction or from random He init (Kaiming-normal weights, 0 biases, BatchNorm 1/0)
and is fine-tuned by SGD (momentum 0.9) on the same mini-batches; accuracy after 0/10/50/200 steps.
The learning rate is chosen per init from ``lr_grid``: the best mean validation accuracy of the
validation nets over the checkpoints after 0 steps (validation images), on the first seed (or on
every seed with ``lr_per_seed``), then used on every test net.
Before each evaluation BatchNorm running statistics are recomputed on ``calibration`` training images
(the GHN predicts no statistics; both inits get the same treatment). Test accuracy is on the test split.

Writes ``ghn.csv`` (one row per split, arch, init, steps, seed), ``ghn.json`` (config, chosen learning
rates and their validation scores, timings, summary), ``ghn.md`` and ``ghn.png`` (mean ± std over seeds
of the per-seed mean over architectures), and one ``ghn_seed<k>.safetensors`` checkpoint per seed.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .. import io, reporting
from ..training.data import load_dataset, validation_split
from .graph import extract_graph
from .model import GHN, assign_parameters
from .sampler import SPACES, ArchSpec, SampledCNN, sample_architectures
from .specialists import train_ghn_on_data
from .train import save_ghn

__all__ = ["run_ghn_experiment", "finetune_curve", "he_init", "summarise", "markdown_table", "GHN_DATASETS",
           "CSV_FIELDS", "SPLITS", "INITS"]

GHN_DATASETS = ("digits", "mnist5k")
CSV_FIELDS = ("split", "arch", "init", "steps", "seed", "accuracy")
SPLITS = ("in_distribution", "deeper", "wider")
INITS = ("ghn", "random")
CHECKPOINTS = (0, 10, 50, 200)


def run_ghn_experiment(dataset: str = "digits", out_dir="ghn_out", seeds=(0, 1, 2), *, steps: int = 700,
                       hidden: int = 32, virtual_distance: int = 5, pool_size: int = 256, nets_per_step: int = 8,
                       batch_size: int = 32, ghn_lr: float = 3e-3, archs_per_split: int = 3, val_archs: int = 1,
                       lr_grid=(0.003, 0.01, 0.03, 0.1), finetune_batch: int = 32, checkpoints=CHECKPOINTS,
                       calibration: int = 256, lr_per_seed: bool = False, threads: int = 1, progress: bool = True,
                       verbose: bool = True) -> dict:
    """Runs the comparison; returns ``{"rows", "summary", "table", "config", "seeds"}`` (also written to ``out_dir``).

    ``lr_per_seed``: choose the fine-tuning learning rates on every seed's validation nets; by default
    they are chosen on the first seed's and reused (the selection costs as much as the test runs).

    ``threads``: intra-op threads (the caller's setting is restored); these nets are small, one is the default.
    """
    if dataset not in GHN_DATASETS:
        raise ValueError(f"dataset: expected one of {GHN_DATASETS}, got {dataset!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    checkpoints = tuple(sorted({int(c) for c in checkpoints}))
    if not checkpoints or checkpoints[0] < 0:
        raise ValueError(f"checkpoints: expected non-negative step counts, got {checkpoints!r}")
    lr_grid = tuple(float(lr) for lr in lr_grid)
    if not lr_grid or min(lr_grid) <= 0:
        raise ValueError(f"lr_grid: expected positive learning rates, got {lr_grid!r}")
    for name, value in (("steps", steps), ("pool_size", pool_size), ("archs_per_split", archs_per_split),
                        ("val_archs", val_archs), ("finetune_batch", finetune_batch), ("calibration", calibration),
                        ("nets_per_step", nets_per_step), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    GHN(hidden=hidden, virtual_distance=virtual_distance)  # checks them now, not after the first seed's set-up
    config = dict(dataset=dataset, seeds=seeds, steps=steps, hidden=hidden, virtual_distance=virtual_distance,
                  pool_size=pool_size, nets_per_step=nets_per_step, batch_size=batch_size, ghn_lr=ghn_lr,
                  archs_per_split=archs_per_split, val_archs=val_archs, lr_grid=list(lr_grid),
                  finetune_batch=finetune_batch, checkpoints=list(checkpoints), calibration=calibration,
                  lr_per_seed=lr_per_seed, threads=threads)
    out = Path(out_dir)
    start = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows, per_seed, chosen = [], [], None
        for seed in seeds:
            seed_rows, info = _one_seed(out, seed, config, progress, None if lr_per_seed else chosen)
            chosen = info["chosen_lr"]
            rows += seed_rows
            per_seed.append(info)
            if verbose:
                print(f"seed {seed}: chosen lr {info['chosen_lr']}, " + ", ".join(
                    f"{k} {v:.1f} s" for k, v in info["timings_s"].items()))
    finally:
        torch.set_num_threads(before)
    summary = summarise(rows, checkpoints)
    result = {"config": config, "rows": rows, "summary": summary, "seeds": per_seed,
              "table": markdown_table(summary, checkpoints), "wall_s": time.perf_counter() - start}
    _write(out, result, dataset)
    if verbose:
        print(f"\n{dataset}: test accuracy, mean ± std over seeds {seeds} ({result['wall_s']:.0f} s)\n")
        print(result["table"])
    return result


def _one_seed(out: Path, seed: int, cfg: dict, progress: bool, chosen: dict | None) -> tuple[list[dict], dict]:
    """One GHN, its held-out nets' rows and the seed's record; ``chosen``: ``{init: lr}`` from an earlier
    seed, or ``None`` to choose here on this seed's validation nets and images."""
    t0 = time.perf_counter()
    splits = load_dataset(cfg["dataset"], None, seed)
    x, y, val_x, val_y = validation_split(splits.train_x, splits.train_y, 0.1, seed)
    shape, classes = tuple(splits.input_shape), splits.num_classes
    side = min(shape[1:])
    # Separate sampling streams per purpose, so adding held-out nets never changes the training pool.
    # The specs train_ghn_on_data's pool holds (training_pool draws them from the same seed).
    pool_specs = sample_architectures(SPACES["in_distribution"], cfg["pool_size"], 100 * seed, side)
    val_specs = [spec for i, split in enumerate(SPLITS) for spec in sample_architectures(
        SPACES[split], cfg["val_archs"], 100 * seed + 10 + i, side, exclude=frozenset(pool_specs))]
    test_specs = {split: sample_architectures(SPACES[split], cfg["archs_per_split"], 100 * seed + 20 + i, side,
                                              exclude=frozenset(pool_specs + val_specs))
                  for i, split in enumerate(SPLITS)}
    t1 = time.perf_counter()
    ghn, losses = train_ghn_on_data(x, y, shape, classes, steps=cfg["steps"], seed=seed, progress=progress,
                                    pool_size=cfg["pool_size"], nets_per_step=cfg["nets_per_step"],
                                    batch_size=cfg["batch_size"], lr=cfg["ghn_lr"], hidden=cfg["hidden"],
                                    virtual_distance=cfg["virtual_distance"])
    sha = save_ghn(out / f"ghn_seed{seed}.safetensors", ghn, {"dataset": cfg["dataset"], "seed": str(seed),
                                                               "steps": str(cfg["steps"])})
    t2 = time.perf_counter()
    calib = x[: cfg["calibration"]]
    common = dict(ghn=ghn, shape=shape, classes=classes, x=x, y=y, calib=calib, checkpoints=cfg["checkpoints"],
                  batch_size=cfg["finetune_batch"], seed=seed)
    selecting = chosen is None
    runs = len(INITS) * (selecting * len(cfg["lr_grid"]) * len(val_specs) + sum(map(len, test_specs.values())))
    bar = tqdm(total=runs, desc=f"fine-tune seed {seed}", leave=False, disable=not progress)
    val_scores, chosen = {}, dict(chosen or {})
    for init in INITS if selecting else ():  # the learning rate, chosen on validation nets and images
        for lr in cfg["lr_grid"]:
            curves = [finetune_curve(spec, init, lr, eval_x=val_x, eval_y=val_y, **common) for spec in val_specs]
            bar.update(len(val_specs))
            val_scores.setdefault(init, {})[str(lr)] = statistics.fmean(
                acc for c in curves for s, acc in c.items() if s > 0 or len(c) == 1)
        chosen[init] = float(max(val_scores[init], key=lambda lr: val_scores[init][lr]))  # ties: first in the grid
    t3 = time.perf_counter()
    rows = []
    for split in SPLITS:
        for spec in test_specs[split]:
            for init in INITS:
                curve = finetune_curve(spec, init, chosen[init], eval_x=splits.test_x, eval_y=splits.test_y, **common)
                bar.update(1)
                rows += [{"split": split, "arch": spec.code(), "init": init, "steps": s, "seed": seed,
                          "accuracy": round(acc, 6)} for s, acc in curve.items()]
    bar.close()
    t4 = time.perf_counter()
    info = {"seed": seed, "chosen_lr": chosen, "lr_chosen_here": selecting, "validation_accuracy": val_scores,
            "checkpoint_sha256": sha,
            "ghn_parameters": sum(p.numel() for p in ghn.parameters()),
            "ghn_loss_first_last_50": [statistics.fmean(losses[:50]), statistics.fmean(losses[-50:])],
            "archs": {"pool": len(pool_specs), "validation": [s.code() for s in val_specs],
                      **{split: [s.code() for s in specs] for split, specs in test_specs.items()}},
            "timings_s": {"setup": t1 - t0, "ghn_training": t2 - t1, "lr_selection": t3 - t2, "test": t4 - t3}}
    return rows, info


def he_init(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random init matching the GHN's normalisation targets: Kaiming-normal conv weights (gain 2) and
    linear weights (gain 1) over fan-in, zero biases, BatchNorm weight 1 and bias 0. In place; returns ``net``."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                gain = 2.0 if isinstance(m, nn.Conv2d) else 1.0
                m.weight.normal_(0.0, (gain / m.weight[0].numel()) ** 0.5, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
    return net


def finetune_curve(spec: ArchSpec, init: str, lr: float, *, ghn: GHN, shape, classes: int, x: Tensor, y: Tensor,
                   calib: Tensor, eval_x: Tensor, eval_y: Tensor, checkpoints=CHECKPOINTS, batch_size: int = 32,
                   seed: int = 0) -> dict[int, float]:
    """``{steps: accuracy on (eval_x, eval_y)}`` of ``spec`` started from ``init`` ("ghn" or "random")
    and fine-tuned by SGD (momentum 0.9) at ``lr`` on ``(x, y)``; the mini-batches depend only on ``seed``."""
    net = SampledCNN(spec, shape[0], classes)
    if init == "ghn":
        with torch.no_grad():
            assign_parameters(net, ghn([extract_graph(net, shape)])[0])
    elif init == "random":
        he_init(net, torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    curve = {}
    for step in range(max(checkpoints) + 1):
        if step in checkpoints:
            curve[step] = _accuracy(net, calib, eval_x, eval_y)
        if step == max(checkpoints):
            break
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        net.train()
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return curve


@torch.no_grad()
def _accuracy(net: nn.Module, calib: Tensor, x: Tensor, y: Tensor) -> float:
    """Accuracy with BatchNorm statistics recomputed on ``calib`` (a cumulative average: momentum None)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        net.train()
        net(calib)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    net.eval()
    correct = sum(int((net(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
    net.train()
    return correct / len(y)


def summarise(rows: list[dict], checkpoints=CHECKPOINTS) -> list[dict]:
    """Per (split, init, steps): the mean over architectures within each seed, then the mean and sample
    std of those over seeds (std 0 for one seed)."""
    out = []
    for split in SPLITS:
        for init in INITS:
            for steps in checkpoints:
                by_seed: dict[int, list[float]] = {}
                for r in rows:
                    if (r["split"], r["init"], int(r["steps"])) == (split, init, steps):
                        by_seed.setdefault(int(r["seed"]), []).append(float(r["accuracy"]))
                if not by_seed:
                    continue
                means = [statistics.fmean(v) for v in by_seed.values()]
                out.append({"split": split, "init": init, "steps": steps, "mean": statistics.fmean(means),
                            "std": statistics.stdev(means) if len(means) > 1 else 0.0, "seeds": len(means),
                            "archs": sum(map(len, by_seed.values()))})
    return out


def markdown_table(summary: list[dict], checkpoints=CHECKPOINTS) -> str:
    """One row per split and init, one column per fine-tuning step count: ``mean ± std``."""
    cell = {(s["split"], s["init"], s["steps"]): f"{s['mean']:.3f} ± {s['std']:.3f}" for s in summary}
    lines = ["| split | init | " + " | ".join(f"{c} steps" for c in checkpoints) + " |",
             "|---|---|" + "---:|" * len(checkpoints)]
    for split in SPLITS:
        for init in INITS:
            if any((split, init, c) in cell for c in checkpoints):
                lines.append(f"| {split} | {init} | " + " | ".join(cell.get((split, init, c), "") for c in checkpoints)
                             + " |")
    return "\n".join(lines) + "\n"


def _plot(path, summary: list[dict], checkpoints, title: str) -> None:
    plt = reporting.pyplot()
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(4.2 * len(SPLITS), 3.6), sharey=True)
    for ax, split in zip(axes, SPLITS):
        for init, color in zip(INITS, ("tab:blue", "tab:gray")):
            pts = sorted((s["steps"], s["mean"], s["std"]) for s in summary
                         if s["split"] == split and s["init"] == init)
            if not pts:
                continue
            xs = [checkpoints.index(p[0]) for p in pts]  # evenly spaced: the step counts span two decades
            mean = [p[1] for p in pts]
            std = [p[2] for p in pts]
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, color=color,
                        label="GHN-predicted" if init == "ghn" else "random (He)")
        ax.set_xticks(range(len(checkpoints)), [str(c) for c in checkpoints])
        ax.set_title(split.replace("_", " "))
        ax.set_xlabel("fine-tuning steps (SGD)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    reporting.save_figure(path, fig)
    plt.close(fig)


def _write(out: Path, result: dict, dataset: str) -> None:
    checkpoints = tuple(result["config"]["checkpoints"])
    reporting.save_csv(out / "ghn.csv", result["rows"], CSV_FIELDS)
    io.save_json(out / "ghn.json", {k: v for k, v in result.items() if k not in ("rows", "table")})
    io.atomic_write(out / "ghn.md", result["table"].encode())
    _plot(out / "ghn.png", result["summary"], checkpoints,
          f"{dataset}: GHN-predicted vs random init on held-out architectures")
