"""Accuracy check of RowAdam on scikit-learn's digits: dense Adam vs meProp + RowAdam.

    python perf/digits_row_adam.py [--epochs 20] [--seeds 0 1 2] [--k 0.05]

MLP 64-500-500-10 (ReLU), batch 10, Adam lr 1e-3 (beta 0.9/0.999, eps 1e-8), standardised inputs,
fixed split ``train_test_split(test_size=0.25, random_state=0)``. Three runs per seed:

- dense: ``nn.Linear`` layers and ``torch.optim.Adam``;
- unified: ``convert(model, k, mode="unified", grad="sparse")`` (output layer dense) + ``RowAdam``;
- per example: the same with ``mode="per_example"``;

and with ``--zero-filled``, for comparison, ``torch.optim.Adam`` fed meProp's dense zero-filled
gradients. Prints the final test accuracy, mean ± std over the seeds.
"""
import argparse
import statistics
import sys
import time

import torch
from torch import nn

import triton_mebp as mebp
from triton_mebp.optim import RowAdam


def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    return as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test)


def build(variant, k, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(),
                          nn.Linear(500, 10))
    if variant == "dense":
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)
    mode = "per_example" if variant.startswith("per_example") else "unified"
    if variant.endswith("zero-filled Adam"):
        model = mebp.convert(model, k=k, mode=mode, grad="dense")
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)
    model = mebp.convert(model, k=k, mode=mode, grad="sparse")
    return model, RowAdam(model.parameters(), lr=1e-3)


def train(variant, k, seed, epochs, data, batch_size=10):
    x_train, y_train, x_test, y_test = data
    model, optimizer = build(variant, k, seed)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x_train), generator=order).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item() * 100


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=float, default=0.05, help="kept ratio of each hidden layer")
    parser.add_argument("--zero-filled", action="store_true",
                        help="also run torch.optim.Adam on meProp's dense zero-filled gradients")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these layers are too small to share)")
    parser.add_argument("--only", nargs="+", help="run only the variants whose name contains "
                        "one of these words (e.g. zero-filled)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    variants = ["dense", "unified + RowAdam", "per_example + RowAdam"]
    if args.zero_filled:
        variants += ["unified + zero-filled Adam", "per_example + zero-filled Adam"]
    if args.only:
        variants = [v for v in variants if any(word in v for word in args.only)]
    k = mebp.resolve_k(args.k, 500)
    print(f"digits, MLP 64-500-500-10, batch 10, Adam lr 1e-3, k={k} ({args.k:.0%}), "
          f"{args.epochs} epochs, seeds {args.seeds}")
    means = {}
    for variant in variants:
        start = time.perf_counter()
        scores = [train(variant, args.k, seed, args.epochs, data) for seed in args.seeds]
        means[variant] = statistics.mean(scores)
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(f"  {variant:32s} {means[variant]:6.2f} ± {spread:4.2f}   "
              f"({', '.join(f'{s:.2f}' for s in scores)}; {time.perf_counter() - start:.0f} s)",
              flush=True)
    for variant in [v for v in variants if v != "dense" and "dense" in means]:
        print(f"  {variant}: {means[variant] - means['dense']:+.2f} points against dense Adam")
    return 0


if __name__ == "__main__":
    sys.exit(main())
