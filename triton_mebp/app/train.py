"""Training an MLP with meProp / meSimp, measuring what the report shows.

``train_one`` trains one model with one seed and records, per epoch: training loss, test
accuracy, the time spent in ``loss.backward()`` alone, and the hidden widths (which shrink under
meSimp). ``run_experiment`` repeats it over seeds and summarizes; ``demo_configs`` is the set of
runs behind ``mebp demo``.
"""

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..functional import MODES, resolve_k
from ..modules import MeLinear, convert

TRAIN_MODES = ("dense",) + MODES
OPTIMIZERS = ("adam", "adagrad", "sgd")
# The paper's settings: AdaGrad lr 0.1 (its MNIST rows), Adam lr 1e-3; SGD lr 0.1 is our choice.
DEFAULT_LR = {"adam": 1e-3, "adagrad": 0.1, "sgd": 0.1}


@dataclass
class TrainConfig:
    """One training setting. ``k`` is a count or a ratio of the hidden width (as in ``convert``).

    ``sparse_grad``: meProp layers give row-sparse weight gradients and the row-sparse optimizers
    of ``triton_mebp.optim`` update only the selected rows. ``simplify``: meSimp; after each of
    the first ``prune_fraction`` of the epochs, hidden neurons selected in fewer than
    ``threshold`` of the examples since the last pruning are removed; ``k`` then stays a fixed
    count (the paper's choice), so no layer shrinks below it.
    """

    mode: str = "dense"
    k: float = 0.05
    hidden: int = 500
    layers: int = 2
    epochs: int = 20
    batch_size: int = 10
    optimizer: str = "adagrad"
    lr: float | None = None
    eps: float | None = None
    sparse_grad: bool = False
    simplify: bool = False
    threshold: float = 0.1
    prune_fraction: float = 0.5
    label: str = ""

    def __post_init__(self):
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"mode must be one of {TRAIN_MODES}, got {self.mode!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("hidden", "layers", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.eps is not None and (self.optimizer == "sgd" or not self.eps > 0):
            raise ValueError(
                f"eps must be positive and is for adam or adagrad, got {self.eps} "
                f"with {self.optimizer}"
            )
        if self.mode != "dense":
            resolve_k(self.k, self.hidden, "the hidden layers")
        if self.simplify:
            if self.mode == "dense":
                raise ValueError(
                    "simplify (meSimp) needs a meProp mode (unified or per_example): "
                    "it prunes by how often each neuron is in the top-k"
                )
            if not 0.0 < self.threshold < 1.0:
                raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
            if not 0.0 < self.prune_fraction <= 1.0:
                raise ValueError(f"prune_fraction must be in (0, 1], got {self.prune_fraction}")
        if not self.label:
            self.label = self.default_label()

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def k_count(self) -> int:
        return self.hidden if self.mode == "dense" else resolve_k(self.k, self.hidden)

    def default_label(self) -> str:
        if self.mode == "dense":
            name = "dense"
        else:
            name = ("meSimp " if self.simplify else "meProp ") + self.mode.replace("_", "-")
            name += f" k={self.k_count}"
        name += f", {self.optimizer}"
        if self.lr is not None and self.lr != DEFAULT_LR[self.optimizer]:
            name += f" lr={self.lr:g}"
        if self.eps is not None:
            name += f" eps={self.eps:g}"
        return name + (" + row-sparse" if self.sparse_grad else "")


def build_mlp(n_features: int, n_classes: int, hidden: int, layers: int) -> nn.Sequential:
    """``layers`` hidden ReLU layers of width ``hidden``, then a linear output layer."""
    blocks, width = [], n_features
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    blocks.append(nn.Linear(width, n_classes))
    return nn.Sequential(*blocks)


def make_optimizer(name: str, params, lr: float, row_sparse: bool, eps: float | None = None):
    """The optimizer ``name``; with ``row_sparse`` the version from ``triton_mebp.optim`` that
    updates only the rows present in a row-sparse gradient (per-row step counts in Adam).
    ``eps``: Adam's or AdaGrad's epsilon (None: the optimizer's default)."""
    params = list(params)
    options = dict(lr=lr) if eps is None else dict(lr=lr, eps=eps)
    if row_sparse:
        from .. import optim

        return {"adam": optim.RowAdam, "adagrad": optim.RowAdagrad, "sgd": optim.RowSGD}[name](
            params, **options
        )
    return {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[name](
        params, **options
    )


def hidden_widths(model: nn.Module) -> list[int]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return [m.out_features for m in linears[:-1]]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_backward(loss, device) -> float:
    """``loss.backward()``; returns the seconds it took alone (the GPU synchronised around it)."""
    _sync(device)
    started = time.perf_counter()
    loss.backward()
    _sync(device)
    return time.perf_counter() - started


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096):
    """``(accuracy in %, mean cross-entropy)`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        correct += int((logits.argmax(1) == target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
    model.train(was_training)
    return 100.0 * correct / max(len(y), 1), loss / max(len(y), 1)


def train_one(config: TrainConfig, dataset, seed: int, device="cpu", on_epoch=None) -> dict:
    """Trains one model; returns its measurements (see the module docstring).

    ``on_epoch(record)`` is called after each epoch (progress display).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    torch.manual_seed(seed)
    model = build_mlp(dataset.n_features, dataset.n_classes, config.hidden, config.layers)
    if config.mode != "dense":
        # meSimp keeps k a fixed count while the layers shrink, as the paper does.
        k = config.k_count if config.simplify else config.k
        model = convert(
            model,
            k=k,
            mode=config.mode,
            grad="sparse" if config.sparse_grad else "dense",
            count_hits=config.simplify,
            inplace=True,
        )
    model.to(device)
    optimizer = make_optimizer(
        config.optimizer, model.parameters(), config.learning_rate, config.sparse_grad, config.eps
    )
    simplifier = None
    if config.simplify:
        from ..simplify import Simplifier

        simplifier = Simplifier(
            model, threshold=config.threshold, optimizer=optimizer, min_width=config.k_count
        )
    prune_epochs = math.ceil(config.epochs * config.prune_fraction) if config.simplify else 0

    x_train, y_train = dataset.x_train.to(device), dataset.y_train.to(device)
    x_test, y_test = dataset.x_test.to(device), dataset.y_test.to(device)
    order = torch.Generator().manual_seed(seed)
    n = len(y_train)
    widths0 = hidden_widths(model)
    epochs = []
    for epoch in range(config.epochs):
        model.train()
        permutation = torch.randperm(n, generator=order).to(device)
        loss_sum = torch.zeros((), device=device)
        backward_s = 0.0
        started = time.perf_counter()
        for start in range(0, n, config.batch_size):
            batch = permutation[start : start + config.batch_size]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            backward_s += timed_backward(loss, device)
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
        _sync(device)
        epoch_s = time.perf_counter() - started
        pruned = None
        if simplifier is not None and epoch < prune_epochs:
            pruned = simplifier.prune()
        accuracy, test_loss = evaluate(model, x_test, y_test)
        record = dict(
            epoch=epoch + 1,
            train_loss=float(loss_sum) / n,
            test_loss=test_loss,
            test_acc=accuracy,
            backward_s=backward_s,
            epoch_s=epoch_s,
            widths=hidden_widths(model),
            params=count_parameters(model),
            pruned=bool(pruned),
        )
        epochs.append(record)
        if on_epoch is not None:
            on_epoch(record)
    last = epochs[-1]
    return dict(
        label=config.label,
        seed=seed,
        config=dataclasses.asdict(config),
        device=str(device),
        initial_widths=widths0,
        test_acc=last["test_acc"],
        test_loss=last["test_loss"],
        widths=last["widths"],
        params=last["params"],
        # The median over epochs: robust to the first epoch's warm-up (kernel compiles).
        backward_s_per_epoch=statistics.median(e["backward_s"] for e in epochs),
        epoch_s=statistics.median(e["epoch_s"] for e in epochs),
        epochs=epochs,
    )


def mean_std(values):
    """Mean and sample standard deviation (0 for one value) of the values that are not None;
    ``(None, None)`` if there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(label: str, runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of the numbers the report shows."""
    acc_mean, acc_std = mean_std(r["test_acc"] for r in runs)
    bwd_mean, bwd_std = mean_std(r["backward_s_per_epoch"] for r in runs)
    widths = [statistics.fmean(ws) for ws in zip(*(r["widths"] for r in runs))]
    return dict(
        label=label,
        config=runs[0]["config"],
        seeds=[r["seed"] for r in runs],
        device=runs[0]["device"],
        test_acc_mean=acc_mean,
        test_acc_std=acc_std,
        backward_s_mean=bwd_mean,
        backward_s_std=bwd_std,
        epoch_s_mean=statistics.fmean(r["epoch_s"] for r in runs),
        initial_widths=runs[0]["initial_widths"],
        widths_mean=widths,
        params_mean=statistics.fmean(r["params"] for r in runs),
        runs=runs,
    )


def add_comparisons(summaries: list[dict]) -> list[dict]:
    """Adds each row's accuracy gap (points) and backward speedup against the dense baseline
    with the same optimizer, hidden size, depth, batch size and epochs: the one with the same
    learning rate and epsilon if there is one, else the one with the defaults (None if neither)."""

    def key(config, lr, eps):
        return (
            config["optimizer"],
            config["hidden"],
            config["layers"],
            config["batch_size"],
            config["epochs"],
            lr,
            eps,
        )

    def lr_of(config):
        return config["lr"] if config["lr"] is not None else DEFAULT_LR[config["optimizer"]]

    baselines = {
        key(s["config"], lr_of(s["config"]), s["config"].get("eps")): s
        for s in summaries
        if s["config"]["mode"] == "dense"
    }
    for s in summaries:
        c = s["config"]
        base = baselines.get(key(c, lr_of(c), c.get("eps")))
        if base is None:
            base = baselines.get(key(c, DEFAULT_LR[c["optimizer"]], None))
        s["baseline"] = base["label"] if base else None
        s["gap_to_dense"] = s["test_acc_mean"] - base["test_acc_mean"] if base else None
        s["speedup"] = (
            base["backward_s_mean"] / s["backward_s_mean"]
            if base and s["backward_s_mean"] > 0
            else None
        )
    return summaries


def run_experiment(configs, dataset, seeds=(0, 1, 2), device="cpu", progress=True) -> list[dict]:
    """Trains every config with every seed; returns one summary per config (see ``summarize``)."""
    configs, seeds = list(configs), list(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config labels must be distinct, got {labels}")
    device = resolve_device(device) if isinstance(device, str) else device
    bar = progress_bar(sum(c.epochs for c in configs) * len(seeds), progress)
    summaries = []
    try:
        for config in configs:
            runs = []
            for seed in seeds:
                bar.set_description(f"{config.label} (seed {seed})")

                def on_epoch(record):
                    bar.update(1)
                    bar.set_postfix(
                        acc=f"{record['test_acc']:.1f}%", width="/".join(map(str, record["widths"]))
                    )

                runs.append(train_one(config, dataset, seed, device, on_epoch))
            summary = summarize(config.label, runs)
            summaries.append(summary)
            bar.write(
                f"{config.label}: test accuracy {summary['test_acc_mean']:.2f} ± "
                f"{summary['test_acc_std']:.2f}%, backward {summary['backward_s_mean']:.3f} "
                f"s/epoch, hidden {'/'.join(f'{w:.0f}' for w in summary['widths_mean'])}"
            )
    finally:
        bar.close()
    return add_comparisons(summaries)


def progress_bar(total: int, enabled: bool, unit: str = "epoch"):
    return tqdm(total=total, unit=unit, dynamic_ncols=True, disable=not enabled)


def benchmark_backward(
    width: int = 2048,
    batch: int = 256,
    ks=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
    modes=MODES,
    device="cpu",
    repeats: int = 7,
) -> list[dict]:
    """Median time of ``loss.backward()`` through one ``width x width`` linear layer (batch
    ``batch``): the dense ``nn.Linear`` and meProp (row-sparse gradient) at each ``k`` ratio."""
    device = resolve_device(device) if isinstance(device, str) else device
    torch.manual_seed(0)
    x = torch.randn(batch, width, device=device)
    dense = nn.Linear(width, width, device=device)

    def time_layer(layer):
        times = []
        for _ in range(repeats + 1):
            layer.zero_grad(set_to_none=True)
            times.append(timed_backward(layer(x).square().sum(), device))
        return statistics.median(times[1:])  # the first call warms up

    rows = [dict(mode="dense", k=width, k_ratio=1.0, backward_s=time_layer(dense))]
    for mode in modes:
        for ratio in ks:
            layer = MeLinear.from_linear(dense, k=ratio, mode=mode, grad="sparse")
            rows.append(
                dict(mode=mode, k=layer.k_count, k_ratio=ratio, backward_s=time_layer(layer))
            )
    for row in rows:
        row.update(
            width=width,
            batch=batch,
            device=str(device),
            speedup=rows[0]["backward_s"] / row["backward_s"],
        )
    return rows


def demo_configs(
    epochs: int = 15,
    hidden: int = 500,
    k_ratio: float = 0.05,
    batch_size: int = 10,
    k_sweep=(0.01, 0.02, 0.1, 0.25),
):
    """The runs behind ``mebp demo``: ``(main, sweep)`` lists of TrainConfig.

    main: per optimizer (AdaGrad lr 0.1, Adam lr 1e-3) the dense baseline, meProp unified and
    per-example at ``k_ratio`` and meSimp. Adam runs twice per meProp mode: the naive setting
    (dense zero-filled gradients into torch.optim.Adam) and row-sparse gradients into RowAdam
    (per-row bias correction); per-example once more with RowAdam at lr 1e-2 and eps 1e-3,
    the setting that closes its gap (see docs/demo.md).
    sweep: meProp unified with AdaGrad at the other ``k_sweep`` ratios (one seed) for the charts.
    """
    common = dict(hidden=hidden, layers=2, epochs=epochs, batch_size=batch_size)
    main = []
    for optimizer in ("adagrad", "adam"):
        main.append(TrainConfig(mode="dense", optimizer=optimizer, **common))
        for mode in MODES:
            main.append(TrainConfig(mode=mode, k=k_ratio, optimizer=optimizer, **common))
            if optimizer == "adam":
                main.append(
                    TrainConfig(
                        mode=mode, k=k_ratio, optimizer=optimizer, sparse_grad=True, **common
                    )
                )
            if optimizer == "adam" and mode == "per_example":
                main.append(
                    TrainConfig(
                        mode=mode,
                        k=k_ratio,
                        optimizer=optimizer,
                        sparse_grad=True,
                        lr=1e-2,
                        eps=1e-3,
                        **common,
                    )
                )
        main.append(
            TrainConfig(
                mode="unified",
                k=k_ratio,
                optimizer=optimizer,
                simplify=True,
                sparse_grad=optimizer == "adam",
                **common,
            )
        )
    sweep, counts = [], {resolve_k(k_ratio, hidden)}
    for ratio in k_sweep:
        config = TrainConfig(mode="unified", k=ratio, optimizer="adagrad", **common)
        if config.k_count not in counts:  # small widths round several ratios to one count
            counts.add(config.k_count)
            sweep.append(config)
    return main, sweep


__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "TRAIN_MODES",
    "TrainConfig",
    "add_comparisons",
    "benchmark_backward",
    "build_mlp",
    "count_parameters",
    "demo_configs",
    "evaluate",
    "hidden_widths",
    "make_optimizer",
    "mean_std",
    "progress_bar",
    "resolve_device",
    "run_experiment",
    "summarize",
    "train_one",
]
