"""A window MLP part-of-speech tagger, trained by the papers' protocol.

Each token is tagged from the word, suffix and shape features of a +-2 window around it (one
embedding table per feature kind, the 5 x 3 embeddings concatenated), then an MLP of two hidden
ReLU layers of 500, the style of the papers' parsing and POS MLPs. The hidden layers are
``MeLinear`` (``convert``; the output layer stays dense). ``run_window_task`` trains on one
CoNLL-U file, picks the epoch by accuracy on a held-out slice of the training sentences (or a
separate development file) and reports the test accuracy at that epoch, as the papers' reference
code selects by development accuracy.
"""

import collections
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import MODES, resolve_k
from ..modules import MeLinear, convert
from .pos import UNSEEN_TAG, read_conllu
from .train import build_mlp, hidden_widths, make_optimizer, timed_backward

WINDOW = 2  # words on each side
BOUNDARY, UNKNOWN = "<s>", "<unk>"  # index 0 and 1 of every feature vocabulary
KINDS = ("word", "suffix", "shape")
WINDOW_MODES = ("dense",) + MODES
WINDOW_OPTIMIZERS = ("adam", "rowadam", "adagrad")
DEFAULT_LR = {"adam": 1e-3, "rowadam": 1e-3, "adagrad": 0.05}
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def word_shape(form: str) -> str:
    """Capitalisation, digits and punctuation: ``"Obama"`` -> ``"Xx"``, ``"1990s"`` -> ``"dx"``,
    ``"e-mail"`` -> ``"x-x"`` (runs of one character class collapse to one symbol)."""
    symbols = []
    for char in form:
        symbol = (
            "X" if char.isupper() else "x" if char.isalpha() else "d" if char.isdigit() else char
        )
        if not symbols or symbols[-1] != symbol:
            symbols.append(symbol)
    return "".join(symbols)[:6]


def token_features(form: str) -> tuple[str, str, str]:
    lower = form.lower()
    return lower, lower[-3:], word_shape(form)


@dataclass
class WindowVocabulary:
    """Feature and tag indices from training sentences only; a feature value seen fewer than
    ``min_count`` times maps to the unknown entry (index 1), so that entry is trained too."""

    values: dict = field(default_factory=dict)  # kind -> list of values
    tags: list = field(default_factory=list)

    def __post_init__(self):
        self.index = {kind: {v: i for i, v in enumerate(vs)} for kind, vs in self.values.items()}
        self.tag_index = {t: i for i, t in enumerate(self.tags)}

    @classmethod
    def from_sentences(cls, sentences, min_count: int = 2) -> "WindowVocabulary":
        counts = {kind: collections.Counter() for kind in KINDS}
        for forms, _ in sentences:
            for form in forms:
                for kind, value in zip(KINDS, token_features(form)):
                    counts[kind][value] += 1
        values = {
            kind: [BOUNDARY, UNKNOWN] + sorted(v for v, n in c.items() if n >= min_count)
            for kind, c in counts.items()
        }
        return cls(values, sorted({t for _, tags in sentences for t in tags}))

    def sizes(self) -> list[int]:
        return [len(self.values[kind]) for kind in KINDS]

    def encode(self, sentences):
        """``(features N x 3·(2·WINDOW+1) int64, tags N int64)`` over all tokens; a tag absent
        from the training sentences is ``UNSEEN_TAG`` (never predicted, counted wrong)."""
        rows, tags = [], []
        width = 2 * WINDOW + 1
        for forms, sentence_tags in sentences:
            ids = [
                [self.index[kind].get(value, 1) for kind, value in zip(KINDS, token_features(f))]
                for f in forms
            ]
            padded = [[0] * len(KINDS)] * WINDOW + ids + [[0] * len(KINDS)] * WINDOW
            for position in range(len(forms)):
                window = padded[position : position + width]
                rows.append([window[w][kind] for kind in range(len(KINDS)) for w in range(width)])
            tags += [self.tag_index.get(t, UNSEEN_TAG) for t in sentence_tags]
        return torch.tensor(rows, dtype=torch.int64), torch.tensor(tags, dtype=torch.int64)


class WindowTagger(nn.Module):
    """Embeddings of the window's word, suffix and shape features, concatenated, then ``mlp``
    (an ``nn.Sequential``: hidden ReLU layers, a linear output)."""

    def __init__(
        self, sizes, n_tags, *, dims=(50, 20, 10), hidden=500, layers=2, activation="relu"
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.embeddings = nn.ModuleList(nn.Embedding(n, d) for n, d in zip(sizes, dims))
        self.width = 2 * WINDOW + 1
        self.mlp = build_mlp(self.width * sum(dims), n_tags, hidden, layers)
        for i, module in enumerate(self.mlp):
            if isinstance(module, nn.ReLU):
                self.mlp[i] = ACTIVATIONS[activation]()

    def forward(self, features):
        columns = features.split(self.width, dim=1)
        x = torch.cat([e(c).flatten(1) for e, c in zip(self.embeddings, columns)], dim=1)
        return self.mlp(x)


@torch.no_grad()
def accuracy(model, features, tags, batch_size: int = 4096) -> float:
    """Percentage of tokens tagged right (tokens with ``UNSEEN_TAG`` count as wrong)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(tags), batch_size):
        predicted = model(features[start : start + batch_size]).argmax(1)
        correct += int((predicted == tags[start : start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / max(len(tags), 1)


@dataclass
class WindowConfig:
    """One setting of the window tagger. ``k``: count or ratio of the hidden width.
    ``optimizer``: ``adam`` (torch.optim.Adam; meProp layers give zero-filled dense gradients),
    ``rowadam`` (``grad="sparse"`` and ``triton_mebp.optim.RowAdam``; embeddings get its dense
    update) or ``adagrad``. ``simplify``: meSimp, pruning after each of the first
    ``prune_fraction`` of the epochs (k stays a count). Two experiments on how a meProp layer's
    weight gradient meets the optimizer: ``row_scale`` divides each selected row of a hidden
    layer's weight gradient by the number of examples that selected it in the batch (per-example
    mode: a mean over those examples instead of a partial sum); ``clip`` clips every gradient
    element to ``[-clip, clip]`` (the reference code clips at 5); ``step_scale`` scales the
    optimizer's step of each hidden weight row by the fraction of the batch's examples that
    selected the row (per-example mode: a row picked by 5 of 100 examples moves 5% of the step).
    ``activation``: of the hidden layers, ``relu`` or ``tanh``."""

    mode: str = "unified"
    k: float = 0.05
    optimizer: str = "adam"
    lr: float | None = None
    hidden: int = 500
    layers: int = 2
    epochs: int = 10
    batch_size: int = 10
    simplify: bool = False
    threshold: float = 0.1
    prune_fraction: float = 0.5
    row_scale: bool = False
    clip: float | None = None
    step_scale: bool = False
    activation: str = "relu"

    def __post_init__(self):
        if self.mode not in WINDOW_MODES:
            raise ValueError(f"mode must be one of {WINDOW_MODES}, got {self.mode!r}")
        if self.optimizer not in WINDOW_OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {WINDOW_OPTIMIZERS}, got {self.optimizer!r}"
            )
        for name in ("hidden", "layers", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.mode != "dense":
            resolve_k(self.k, self.hidden, "the hidden layers")
        counted = self.row_scale or self.step_scale
        if (self.simplify or counted) and self.mode == "dense":
            raise ValueError(
                "simplify, row_scale and step_scale need a meProp mode (unified or per_example)"
            )
        if self.simplify and counted:
            raise ValueError(
                "simplify uses the hit counters that row_scale and step_scale use: choose one"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip!r}")

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def k_count(self) -> int:
        return self.hidden if self.mode == "dense" else resolve_k(self.k, self.hidden)


def split_held_out(sentences, fraction: float = 0.1):
    """``(train, held_out)``: every ``round(1 / fraction)``-th sentence is held out (spread over
    the file, so each genre of a corpus is represented), the rest trains."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    step = max(2, round(1 / fraction))
    held = [s for i, s in enumerate(sentences) if i % step == step - 1]
    return [s for i, s in enumerate(sentences) if i % step != step - 1], held


def train_window(
    config: WindowConfig,
    data: dict,
    vocab: WindowVocabulary,
    seed: int,
    device="cpu",
    on_epoch=None,
) -> dict:
    """Trains one tagger; ``data`` maps "train", "held_out" and optionally "test" to encoded
    ``(features, tags)``. Returns per-epoch records and the test accuracy at the epoch with the
    best held-out accuracy (the first such epoch; with meSimp, among the epochs after the last
    prune, so that the reported model is the simplified one)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = WindowTagger(
        vocab.sizes(),
        len(vocab.tags),
        hidden=config.hidden,
        layers=config.layers,
        activation=config.activation,
    )
    row_sparse = config.optimizer == "rowadam"
    if config.mode != "dense":
        model.mlp = convert(
            model.mlp,
            k=config.k_count,
            mode=config.mode,
            grad="sparse" if row_sparse else "dense",
            count_hits=config.row_scale or config.step_scale,
            inplace=True,
        )
    counted = (
        [m for m in model.mlp.modules() if isinstance(m, MeLinear)]
        if config.row_scale or config.step_scale
        else []
    )
    model.to(device)
    optimizer = make_optimizer(
        "adagrad" if config.optimizer == "adagrad" else "adam",
        model.parameters(),
        config.learning_rate,
        row_sparse,
    )
    simplifier = None
    if config.simplify:
        from ..simplify import Simplifier

        simplifier = Simplifier(
            model.mlp, threshold=config.threshold, optimizer=optimizer, min_width=config.k_count
        )
    prune_epochs = math.ceil(config.epochs * config.prune_fraction) if config.simplify else 0
    x, y = (t.to(device) for t in data["train"])
    evaluated = {
        name: tuple(t.to(device) for t in data[name])
        for name in ("held_out", "test")
        if name in data
    }
    order = torch.Generator().manual_seed(seed)
    records = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        permutation = torch.randperm(len(y), generator=order).to(device)
        loss_sum, backward_s, started = torch.zeros((), device=device), 0.0, time.perf_counter()
        for start in range(0, len(y), config.batch_size):
            batch = permutation[start : start + config.batch_size]
            for layer in counted:
                layer.reset_hits()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            backward_s += timed_backward(loss, device)
            if config.row_scale:
                for layer in counted:
                    _divide_rows(layer.weight, layer.hits)
            if config.clip is not None:
                _clip(model.parameters(), config.clip)
            before = (
                [layer.weight.detach().clone() for layer in counted] if config.step_scale else []
            )
            optimizer.step()
            with torch.no_grad():
                for layer, old in zip(counted, before):
                    fraction = (layer.hits.to(old.dtype) / len(batch)).unsqueeze(1)
                    layer.weight.copy_(torch.lerp(old, layer.weight, fraction))
            loss_sum += loss.detach() * len(batch)
        train_s = time.perf_counter() - started
        if simplifier is not None and epoch <= prune_epochs:
            simplifier.prune()
        record = dict(
            epoch=epoch,
            train_loss=float(loss_sum) / len(y),
            backward_s=backward_s,
            train_s=train_s,
            widths=hidden_widths(model.mlp),
        )
        for name, (features, tags) in evaluated.items():
            record[f"{name}_acc"] = accuracy(model, features, tags)
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    eligible = records[prune_epochs:] or records
    best = max(eligible, key=lambda r: (r["held_out_acc"], -r["epoch"]))
    return dict(
        seed=seed,
        config=dataclasses.asdict(config),
        best_epoch=best["epoch"],
        held_out_acc=best["held_out_acc"],
        test_acc=best.get("test_acc"),
        last_test_acc=records[-1].get("test_acc"),
        widths=best["widths"],
        backward_s_per_epoch=statistics.median(r["backward_s"] for r in records),
        train_s_per_epoch=statistics.median(r["train_s"] for r in records),
        epochs=records,
    )


def _divide_rows(weight, counts):
    """Divides each row of ``weight.grad`` (dense or row-sparse) by its count (rows with count 0
    have no gradient)."""
    grad = weight.grad
    scale = 1.0 / counts.clamp(min=1).to(weight.dtype)
    if grad.layout == torch.sparse_coo:
        grad = grad.coalesce()
        weight.grad = torch.sparse_coo_tensor(
            grad.indices(),
            grad.values() * scale[grad.indices()[0]].unsqueeze(1),
            grad.shape,
            is_coalesced=True,
        )
    else:
        grad.mul_(scale.unsqueeze(1))


def _clip(params, limit):
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if grad.layout == torch.sparse_coo:
            grad = grad.coalesce()
            param.grad = torch.sparse_coo_tensor(
                grad.indices(), grad.values().clamp(-limit, limit), grad.shape, is_coalesced=True
            )
        else:
            grad.clamp_(-limit, limit)


def load_window_data(train_path, test_path=None, dev_path=None, held_out_fraction=0.1):
    """Reads CoNLL-U files and encodes them: ``(data, vocab, counts)``. Without ``dev_path`` the
    held-out set is a slice of the training file (``split_held_out``)."""
    for name, path in (("train", train_path), ("test", test_path), ("dev", dev_path)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{name} file {path} does not exist")
    train = read_conllu(train_path)
    if dev_path is None:
        train, held_out = split_held_out(train, held_out_fraction)
    else:
        held_out = read_conllu(dev_path)
    sets = {"train": train, "held_out": held_out}
    if test_path is not None:
        sets["test"] = read_conllu(test_path)
    vocab = WindowVocabulary.from_sentences(train)
    data = {name: vocab.encode(s) for name, s in sets.items()}
    counts = {
        f"{name}_{unit}": n
        for name, s in sets.items()
        for unit, n in (("sentences", len(s)), ("tokens", sum(len(f) for f, _ in s)))
    }
    counts.update(
        {f"{kind}_values": n for kind, n in zip(KINDS, vocab.sizes())}, tags=len(vocab.tags)
    )
    return data, vocab, counts


def summarize_window(runs) -> dict:
    def mean_std(values):
        values = [v for v in values if v is not None]
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    summary = dict(config=runs[0]["config"], seeds=[r["seed"] for r in runs], runs=runs)
    for key in ("test_acc", "held_out_acc", "last_test_acc", "best_epoch", "backward_s_per_epoch"):
        summary[key], summary[key + "_std"] = mean_std([r[key] for r in runs])
    summary["widths"] = [statistics.fmean(w) for w in zip(*(r["widths"] for r in runs))]
    return summary


__all__ = [
    "WindowConfig",
    "WindowTagger",
    "WindowVocabulary",
    "accuracy",
    "load_window_data",
    "split_held_out",
    "summarize_window",
    "token_features",
    "train_window",
    "word_shape",
]
