"""The ``ghn`` sub-command's parser and handler (wired into ``mnn_fast.cli`` by ``add_ghn_parser``)."""
from __future__ import annotations

import argparse

__all__ = ["add_ghn_parser", "cmd_ghn"]


def add_ghn_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``ghn`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``); returns its parser."""
    from .experiment import GHN_DATASETS

    p = subparsers.add_parser("ghn", help="graph hypernetwork: predicted vs random init on held-out CNNs",
                              description=cmd_ghn.__doc__)
    p.add_argument("--dataset", default="digits", choices=list(GHN_DATASETS), help="an embedded data set")
    p.add_argument("--out", default="ghn_out", help="where ghn.csv, ghn.json, ghn.md, ghn.png and the checkpoints go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one GHN and one held-out architecture sample per seed")
    p.add_argument("--steps", type=int, default=700, help="GHN training steps (meta-batches) per seed")
    p.add_argument("--hidden", type=int, default=32, help="GHN node embedding size")
    p.add_argument("--virtual-distance", type=int, default=5, help="virtual edges up to this shortest-path length")
    p.add_argument("--pool-size", type=int, default=256, help="distinct training architectures per seed")
    p.add_argument("--nets-per-step", type=int, default=8, help="architectures per meta-batch")
    p.add_argument("--batch-size", type=int, default=32, help="images per GHN training step (shared by its nets)")
    p.add_argument("--ghn-lr", type=float, default=3e-3, help="Adam learning rate of the GHN")
    p.add_argument("--archs-per-split", type=int, default=3, help="held-out test architectures per split and seed")
    p.add_argument("--val-archs", type=int, default=1,
                   help="held-out architectures per split that choose the fine-tuning lr (validation images)")
    p.add_argument("--lr-grid", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1],
                   help="fine-tuning learning rates to choose from (per init, on validation accuracy)")
    p.add_argument("--finetune-steps", type=int, nargs="+", default=[0, 10, 50, 200],
                   help="SGD step counts at which accuracy is recorded")
    p.add_argument("--calibration", type=int, default=256,
                   help="training images that recompute BatchNorm statistics before each evaluation")
    p.add_argument("--lr-per-seed", action="store_true",
                   help="choose the fine-tuning lr on every seed's validation nets (default: on the first seed's)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (small nets: 1 is fastest)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.set_defaults(func=cmd_ghn)
    return p


def cmd_ghn(args) -> None:
    """Trains a GHN per seed on random small CNNs, then compares its predicted parameters with random
    init on held-out in-distribution, deeper and wider CNNs, before and after SGD fine-tuning."""
    from .experiment import run_ghn_experiment

    run_ghn_experiment(args.dataset, args.out, args.seeds, steps=args.steps, hidden=args.hidden,
                       virtual_distance=args.virtual_distance, pool_size=args.pool_size,
                       nets_per_step=args.nets_per_step, batch_size=args.batch_size, ghn_lr=args.ghn_lr,
                       archs_per_split=args.archs_per_split, val_archs=args.val_archs, lr_grid=args.lr_grid,
                       checkpoints=args.finetune_steps, calibration=args.calibration, lr_per_seed=args.lr_per_seed,
                       threads=args.threads, progress=not args.no_progress)
    print(f"\nwritten: {args.out}/ghn.csv, ghn.json, ghn.md, ghn.png, ghn_seed<k>.safetensors")
