"""Part-of-speech tagging with meProp: CoNLL-U reading, a tagger model, training and evaluation.

The paper's largest backward speedups are on an LSTM tagger (embedding, one LSTM layer of hidden
size 500, a dense output layer). ``run_pos_task`` trains that tagger on Universal Dependencies
CoNLL-U files (UPOS tags) with ``MeLSTM`` and, for comparison, with ``nn.LSTM`` from the same
initial weights, and reports token accuracy and backward time of each.
"""

import collections
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..functional import MODES, resolve_k
from ..rnn import MeLSTM
from .train import mean_std, timed_backward

PAD, UNKNOWN = "<pad>", "<unk>"
UNSEEN_TAG = -1  # a tag absent from the training file: never predicted, always counted wrong
PAD_TAG = -100
OPTIMIZERS = {
    "adam": (torch.optim.Adam, 1e-3),
    "adagrad": (torch.optim.Adagrad, 0.05),
    "sgd": (torch.optim.SGD, 0.1),
}
TAGGER_MODES = (*MODES, "dense")


def read_conllu(path) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL-U file as ``(forms, upos_tags)`` pairs.

    Comment lines (``#``) are skipped, and so are multi-word token lines (ids like ``3-4``) and
    empty nodes (ids like ``5.1``): the tags belong to the syntactic words. A malformed line
    raises ``ValueError`` naming the file and the line number.
    """
    path = Path(path)
    sentences, forms, tags = [], [], []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")
        if not line.strip():
            if forms:
                sentences.append((forms, tags))
                forms, tags = [], []
            continue
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 10:
            raise ValueError(
                f"{path}:{number}: expected 10 tab-separated fields, got {len(fields)}: "
                f"{line[:80]!r}"
            )
        token_id, form, upos = fields[0], fields[1], fields[3]
        if "-" in token_id or "." in token_id:
            separator = "-" if "-" in token_id else "."
            parts = token_id.split(separator)
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ValueError(f"{path}:{number}: bad token id {token_id!r}")
            continue
        if not token_id.isdigit() or int(token_id) < 1:
            raise ValueError(f"{path}:{number}: bad token id {token_id!r} (expected 1, 2, ...)")
        if not form or upos in ("", "_") or any(c.isspace() for c in upos):
            raise ValueError(
                f"{path}:{number}: word {token_id} lacks a form or a UPOS tag "
                f"(form {form!r}, UPOS {upos!r})"
            )
        forms.append(form)
        tags.append(upos)
    if forms:
        sentences.append((forms, tags))
    if not sentences:
        raise ValueError(f"{path}: no sentences found")
    return sentences


@dataclass
class Vocabulary:
    """Word and tag indices built from training sentences only.

    Index 0 is padding and 1 the unknown word; words seen fewer than ``min_count`` times in the
    training file map to the unknown word, so its embedding is trained too.
    """

    words: list[str] = field(default_factory=lambda: [PAD, UNKNOWN])
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.word_index = {w: i for i, w in enumerate(self.words)}
        self.tag_index = {t: i for i, t in enumerate(self.tags)}

    @classmethod
    def from_sentences(cls, sentences, min_count: int = 2) -> "Vocabulary":
        counts = collections.Counter(w for forms, _ in sentences for w in forms)
        words = [PAD, UNKNOWN] + sorted(w for w, n in counts.items() if n >= min_count)
        tags = sorted({t for _, tags in sentences for t in tags})
        return cls(words, tags)

    def encode(self, sentences):
        """``(word ids, tag ids)`` lists per sentence; unknown words -> 1, unseen tags -> -1."""
        return [
            (
                [self.word_index.get(w, 1) for w in forms],
                [self.tag_index.get(t, UNSEEN_TAG) for t in tags],
            )
            for forms, tags in sentences
        ]


def batches(encoded, batch_size: int, device, generator=None):
    """Padded ``(words B x T, tags B x T, lengths B)`` batches, in a random order if ``generator``."""
    order = (
        torch.randperm(len(encoded), generator=generator).tolist()
        if generator is not None
        else list(range(len(encoded)))
    )
    for start in range(0, len(order), batch_size):
        chosen = [encoded[i] for i in order[start : start + batch_size]]
        lengths = torch.tensor([len(w) for w, _ in chosen])
        words = torch.zeros(len(chosen), int(lengths.max()), dtype=torch.int64)
        tags = torch.full_like(words, PAD_TAG)
        for row, (w, t) in enumerate(chosen):
            words[row, : len(w)] = torch.tensor(w)
            tags[row, : len(t)] = torch.tensor(t)
        yield words.to(device), tags.to(device), lengths


class Tagger(nn.Module):
    """Embedding, one LSTM layer (``MeLSTM`` or, with ``mode="dense"``, ``nn.LSTM``), dense output.

    The output layer keeps full back propagation, as in the paper.
    """

    def __init__(self, n_words, n_tags, *, embedding_dim=100, hidden=500, mode="unified", k=0.05):
        super().__init__()
        if mode not in TAGGER_MODES:
            raise ValueError(f"mode must be one of {TAGGER_MODES}, got {mode!r}")
        self.embedding = nn.Embedding(n_words, embedding_dim, padding_idx=0)
        if mode == "dense":
            self.lstm = nn.LSTM(embedding_dim, hidden, batch_first=True)
        else:
            self.lstm = MeLSTM(embedding_dim, hidden, batch_first=True, k=k, mode=mode)
        self.output = nn.Linear(hidden, n_tags)

    def forward(self, words, lengths):
        packed = pack_padded_sequence(
            self.embedding(words), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        hidden, _ = self.lstm(packed)
        hidden, _ = pad_packed_sequence(hidden, batch_first=True, total_length=words.shape[1])
        return self.output(hidden)


@torch.no_grad()
def token_accuracy(model, encoded, batch_size, device) -> float:
    """Percentage of tokens whose predicted tag is the gold tag."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for words, tags, lengths in batches(encoded, batch_size, device):
        predicted = model(words, lengths).argmax(-1)
        real = tags != PAD_TAG
        correct += int(((predicted == tags) & real).sum())
        total += int(real.sum())
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def train_tagger(
    model,
    train,
    dev,
    test=None,
    *,
    epochs=5,
    batch_size=32,
    optimizer="adam",
    lr=None,
    seed=0,
    device="cpu",
    progress=True,
    label="",
) -> dict:
    """Trains ``model`` on encoded sentences; returns accuracies and per-epoch timings.

    ``dev_accuracy`` and ``test_accuracy`` are those of the epoch with the best development
    accuracy (``best_epoch``), as the papers select; ``last_test_accuracy`` is the last epoch's.

    ``backward_s`` is the wall-clock time of ``loss.backward()`` summed over an epoch (with CUDA
    synchronized around it), ``train_s`` the whole epoch of forward, backward and update.
    """
    optimizer_class, default_lr = OPTIMIZERS[optimizer]
    opt = optimizer_class(model.parameters(), lr=default_lr if lr is None else lr)
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD_TAG)
    generator = torch.Generator().manual_seed(seed)
    records = []
    model.train()
    for epoch in range(1, epochs + 1):
        backward_s = loss_sum = 0.0
        tokens = 0
        start = time.perf_counter()
        for words, tags, lengths in batches(train, batch_size, device, generator):
            scores = model(words, lengths)
            loss = loss_fn(scores.reshape(-1, scores.shape[-1]), tags.reshape(-1))
            opt.zero_grad(set_to_none=True)
            backward_s += timed_backward(loss, device)
            opt.step()
            n = int(lengths.sum())
            loss_sum += loss.item() * n
            tokens += n
        train_s = time.perf_counter() - start
        dev_accuracy = token_accuracy(model, dev, batch_size, device)
        records.append(
            dict(
                epoch=epoch,
                train_loss=loss_sum / tokens,
                dev_accuracy=dev_accuracy,
                backward_s=backward_s,
                train_s=train_s,
                test_accuracy=token_accuracy(model, test, batch_size, device) if test else None,
            )
        )
        if progress:
            print(
                f"pos {label} seed {seed} epoch {epoch}/{epochs}: loss {loss_sum / tokens:.4f}, "
                f"dev {dev_accuracy:.2f}%, backward {backward_s:.2f} s, epoch {train_s:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    # The papers' protocol: the epoch with the best development accuracy (the first of ties).
    best = max(records, key=lambda r: (r["dev_accuracy"], -r["epoch"]))
    return dict(
        seed=seed,
        best_epoch=best["epoch"],
        dev_accuracy=best["dev_accuracy"],
        test_accuracy=best["test_accuracy"],
        last_test_accuracy=records[-1]["test_accuracy"],
        backward_s_per_epoch=statistics.fmean(r["backward_s"] for r in records),
        train_s_per_epoch=statistics.fmean(r["train_s"] for r in records),
        epochs=records,
    )


def _summarize(runs, lstm_text):
    summary = {"lstm": lstm_text, "runs": runs}
    for key in ("dev_accuracy", "test_accuracy", "backward_s_per_epoch", "train_s_per_epoch"):
        summary[key], summary[key + "_std"] = mean_std([r[key] for r in runs])
    return summary


def _write_outputs(out, result):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pos_results.json").write_text(json.dumps(result, indent=2))
    with open(out / "pos_epochs.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f,
            fieldnames=[
                "model",
                "seed",
                "epoch",
                "train_loss",
                "dev_accuracy",
                "test_accuracy",
                "backward_s",
                "train_s",
            ],
        )
        writer.writeheader()
        for model_name, summary in result["models"].items():
            for run in summary["runs"]:
                for record in run["epochs"]:
                    writer.writerow(dict(record, model=model_name, seed=run["seed"]))


def run_pos_task(
    train_path,
    dev_path,
    test_path=None,
    *,
    mode="unified",
    k=0.05,
    hidden=500,
    embedding_dim=100,
    epochs=5,
    batch_size=32,
    optimizer="adam",
    lr=None,
    seeds=(0,),
    device="cpu",
    out=None,
    progress=True,
) -> dict:
    """Trains the tagger on a CoNLL-U training file and reports UPOS token accuracy and timings.

    With ``mode`` "unified" or "per_example" the LSTM is a ``MeLSTM`` (``k``: count or ratio of
    the 4 * hidden gate width) and the same tagger with ``nn.LSTM`` is trained as the baseline,
    from the same initial weights for each seed; ``mode="dense"`` trains the baseline alone. The
    vocabulary comes from the training file only. ``lr`` None takes the optimizer's default
    (adam 1e-3, adagrad 0.05, sgd 0.1).

    Returns ``{"task", "config", "data", "models", "backward_speedup"}``: ``models`` maps "mebp"
    (absent for mode "dense") and "dense" to ``{"lstm", "runs", "dev_accuracy",
    "test_accuracy", "backward_s_per_epoch", "train_s_per_epoch"}`` plus a ``_std`` of each over
    the seeds; each run holds the seed, the dev and test accuracy (percent; test None without a
    test file) at the epoch with the best dev accuracy (``best_epoch``), the last epoch's test
    accuracy, mean seconds per epoch and per-epoch records. ``backward_speedup`` is the dense
    backward time over the meProp one (None for mode "dense"). With ``out``, writes
    ``pos_results.json`` and ``pos_epochs.csv`` into that folder.
    """
    if mode not in TAGGER_MODES:
        raise ValueError(f"mode must be one of {TAGGER_MODES}, got {mode!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
    for name, value in (
        ("hidden", hidden),
        ("embedding_dim", embedding_dim),
        ("epochs", epochs),
        ("batch_size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    k_count = resolve_k(k, 4 * hidden, "the LSTM gates") if mode != "dense" else 4 * hidden
    paths = {"train": train_path, "dev": dev_path, "test": test_path}
    for name, path in paths.items():
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{name} file {path} does not exist")
    device = torch.device(device)

    sentences = {name: read_conllu(path) for name, path in paths.items() if path is not None}
    vocab = Vocabulary.from_sentences(sentences["train"])
    encoded = {name: vocab.encode(s) for name, s in sentences.items()}
    result = {
        "task": "pos",
        "config": dict(
            train=str(train_path),
            dev=str(dev_path),
            test=None if test_path is None else str(test_path),
            mode=mode,
            k=k,
            k_count=k_count,
            hidden=hidden,
            embedding_dim=embedding_dim,
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=OPTIMIZERS[optimizer][1] if lr is None else lr,
            seeds=list(seeds),
            device=str(device),
            threads=torch.get_num_threads(),
            torch=torch.__version__,
        ),
        "data": {
            f"{name}_{unit}": count
            for name, s in sentences.items()
            for unit, count in (("sentences", len(s)), ("tokens", sum(len(f) for f, _ in s)))
        },
        "models": {},
    }
    result["data"].update(words=len(vocab.words), tags=len(vocab.tags))

    variants = ([("mebp", mode)] if mode != "dense" else []) + [("dense", "dense")]
    for name, variant in variants:
        runs, lstm_text = [], ""
        for seed in seeds:
            torch.manual_seed(seed)  # the same initial weights for both variants
            model = Tagger(
                len(vocab.words),
                len(vocab.tags),
                embedding_dim=embedding_dim,
                hidden=hidden,
                mode=variant,
                k=k_count,
            ).to(device)
            lstm_text = repr(model.lstm)
            runs.append(
                train_tagger(
                    model,
                    encoded["train"],
                    encoded["dev"],
                    encoded.get("test"),
                    epochs=epochs,
                    batch_size=batch_size,
                    optimizer=optimizer,
                    lr=lr,
                    seed=seed,
                    device=device,
                    progress=progress,
                    label=name,
                )
            )
        result["models"][name] = _summarize(runs, lstm_text)
    models = result["models"]
    result["backward_speedup"] = (
        (models["dense"]["backward_s_per_epoch"] / models["mebp"]["backward_s_per_epoch"])
        if "mebp" in models
        else None
    )
    if out is not None:
        _write_outputs(out, result)
    return result
