"""Accuracy check of RowAdam on scikit-learn's digits: dense Adam vs meProp + RowAdam.

    python perf/digits_row_adam.py [--epochs 20 30] [--seeds 0 1 2] [--k 0.05] [--zero-filled]
                                   [--out perf/results/digits-row-adam.csv]

MLP 64-500-500-10 (ReLU), batch 10, Adam lr 1e-3 (beta 0.9/0.999, eps 1e-8), standardised inputs,
fixed split ``train_test_split(test_size=0.25, random_state=0)``. Three runs per seed:

- dense: ``nn.Linear`` layers and ``torch.optim.Adam``;
- unified: ``convert(model, k, mode="unified", grad="sparse")`` (output layer dense) + ``RowAdam``;
- per example: the same with ``mode="per_example"``;

and with ``--zero-filled``, for comparison, ``torch.optim.Adam`` fed meProp's dense zero-filled
gradients. Prints the test accuracy after each of the given epoch counts (one run per seed and
variant, evaluated on the way), mean ± std over the seeds, and writes one row per (variant, seed,
epochs) to ``--out``: the columns of ``COLUMNS`` plus the benchmark harness's environment columns
(device, versions, commit, time).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import triton_mebp as mebp
from triton_mebp.bench import harness
from triton_mebp.optim import RowAdam

COLUMNS = ["task", "variant", "k", "epochs", "seed", "metric", "value"]


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
    model = nn.Sequential(
        nn.Linear(64, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10)
    )
    if variant == "dense":
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)
    mode = "per_example" if variant.startswith("per_example") else "unified"
    if variant.endswith("zero-filled Adam"):
        model = mebp.convert(model, k=k, mode=mode, grad="dense")
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)
    model = mebp.convert(model, k=k, mode=mode, grad="sparse")
    return model, RowAdam(model.parameters(), lr=1e-3)


def train(variant, k, seed, epochs, data, batch_size=10):
    """{epoch count: test accuracy in %} at each of ``epochs`` (ascending) of one training run."""
    x_train, y_train, x_test, y_test = data
    model, optimizer = build(variant, k, seed)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(seed)
    scores = {}
    for epoch in range(1, max(epochs) + 1):
        model.train()
        for batch in torch.randperm(len(x_train), generator=order).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
        if epoch in epochs:
            model.eval()
            with torch.no_grad():
                scores[epoch] = (model(x_test).argmax(1) == y_test).float().mean().item() * 100
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        default=[20],
        help="epoch counts to report (one run per seed, evaluated at each)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=float, default=0.05, help="kept ratio of each hidden layer")
    parser.add_argument(
        "--zero-filled",
        action="store_true",
        help="also run torch.optim.Adam on meProp's dense zero-filled gradients",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these layers are too small to share)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        help="run only the variants whose name contains one of these words (e.g. zero-filled)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "digits-row-adam.csv",
        help="CSV of the accuracies (replaced)",
    )
    args = parser.parse_args(argv)
    epochs = sorted(set(args.epochs))
    if epochs[0] < 1:
        parser.error(f"--epochs must be positive, got {args.epochs}")
    torch.set_num_threads(args.threads)
    data = load_digits_split()
    variants = ["dense", "unified + RowAdam", "per_example + RowAdam"]
    if args.zero_filled:
        variants += ["unified + zero-filled Adam", "per_example + zero-filled Adam"]
    if args.only:
        variants = [v for v in variants if any(word in v for word in args.only)]
    k = mebp.resolve_k(args.k, 500)
    print(
        f"digits, MLP 64-500-500-10, batch 10, Adam lr 1e-3, k={k} ({args.k:.0%}), "
        f"epochs {epochs}, seeds {args.seeds}"
    )
    rows, means = [], {}
    for variant in variants:
        start = time.perf_counter()
        runs = {seed: train(variant, args.k, seed, epochs, data) for seed in args.seeds}
        for epoch in epochs:
            scores = [runs[seed][epoch] for seed in args.seeds]
            rows += [
                dict(
                    task="digits 64-500-500-10",
                    variant=variant,
                    k=k,
                    epochs=epoch,
                    seed=seed,
                    metric="test_accuracy_pct",
                    value=f"{runs[seed][epoch]:.4f}",
                )
                for seed in args.seeds
            ]
            means[variant, epoch] = statistics.mean(scores)
            spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
            print(
                f"  {epoch:3d} epochs  {variant:32s} {means[variant, epoch]:6.2f} ± {spread:4.2f}   "
                f"({', '.join(f'{s:.2f}' for s in scores)})",
                flush=True,
            )
        print(f"  ({variant}: {time.perf_counter() - start:.0f} s)", flush=True)
    for variant, epoch in [
        key for key in means if key[0] != "dense" and ("dense", key[1]) in means
    ]:
        print(
            f"  {epoch:3d} epochs  {variant}: {means[variant, epoch] - means['dense', epoch]:+.2f} "
            "points against dense Adam"
        )
    harness.write_rows(rows, args.out, harness.environment("cpu"), columns=COLUMNS)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
