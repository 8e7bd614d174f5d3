"""A short demonstration on scikit-learn's embedded digits: train, route, compare, time.

Trains a small MLP switch, then ten specialists that start from the switch's weights and train on
the samples the switch routes to them (dataset threshold), and reports switch-only vs MNN test
accuracy and the fused engine's speed against the paper's naive loop on the same inputs.
"""
from __future__ import annotations

import argparse
import copy
import torch
from torch import nn
from tqdm import tqdm

from .benchmark import best_time
from .module import MetaNeuralNetwork
from .reference import naive_forward


def load_digits_split(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: ``Tensor[n, 64] float32`` in ``[0, 1]`` and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _mlp(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _fit(model: nn.Module, x, y, epochs: int, seed: int, lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def run(dataset_threshold: float = 0.1, test_threshold: float = 0.2, seed: int = 0) -> dict:
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    torch.manual_seed(seed)
    switch = _fit(_mlp(), x_tr, y_tr, epochs=15, seed=seed)
    with torch.no_grad():
        train_probs = torch.softmax(switch(x_tr), 1)
    specialists = []
    for e in tqdm(range(10), desc="specialists", leave=False):
        subset = (train_probs[:, e] > dataset_threshold).nonzero().squeeze(1)
        specialists.append(_fit(copy.deepcopy(switch), x_tr[subset], y_tr[subset], epochs=10, seed=seed + e + 1))
    mnn = MetaNeuralNetwork(switch, specialists, threshold=test_threshold)
    with torch.no_grad():
        switch_acc = (switch(x_te).argmax(1) == y_te).float().mean().item()
        out, routing = mnn(x_te, return_routing=True)
        mnn_acc = (out.argmax(1) == y_te).float().mean().item()
        naive = naive_forward(switch, specialists, x_te, threshold=test_threshold)
        batch = x_te.repeat(8, 1)  # a bigger batch so the timing is not all Python overhead
        t_engine = best_time(lambda: mnn(batch))
        t_naive = best_time(lambda: naive_forward(switch, specialists, batch, threshold=test_threshold))
    return {
        "switch_acc": switch_acc,
        "mnn_acc": mnn_acc,
        "bitwise_equal_to_naive": bool(torch.equal(out, naive)),
        "experts_per_sample": routing.perm.numel() / len(x_te),
        "backend": mnn.backend,
        "batch": len(batch),
        "engine_images_per_s": len(batch) / t_engine,
        "naive_images_per_s": len(batch) / t_naive,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-threshold", type=float, default=0.1)
    parser.add_argument("--test-threshold", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    r = run(args.dataset_threshold, args.test_threshold, args.seed)
    print(f"load_digits test set, dataset threshold {args.dataset_threshold}, test threshold {args.test_threshold}")
    print(f"  switch-only accuracy      {r['switch_acc']:.4f}")
    print(f"  MNN accuracy              {r['mnn_acc']:.4f}  ({r['experts_per_sample']:.2f} specialists per sample)")
    print(f"  MNN == naive loop bitwise {r['bitwise_equal_to_naive']}")
    print(f"  engine ({r['backend']:>5}) images/s  {r['engine_images_per_s']:>10.0f}   (batch {r['batch']})")
    print(f"  naive loop     images/s  {r['naive_images_per_s']:>10.0f}")
    print(f"  speed-up                  {r['engine_images_per_s'] / r['naive_images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
