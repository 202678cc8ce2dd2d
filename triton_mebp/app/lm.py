"""A character-level causal transformer language model (``mebp train --task lm``).

The text is the documentation topics that ship with every Python installation (the standard
library's ``pydoc_data.topics``, about 465,000 characters), joined in sorted topic order; the
first 90% of its characters are the training text, the rest the validation text. The model is a
small GPT (pre-norm blocks of causal self-attention and a GELU MLP built from ``nn.Linear``, or
``nn.TransformerEncoder`` layers with ``arch="torch"``). ``train_lm`` trains one setting for a
number of steps on random windows of the training text and measures validation loss (nats per
character) and bits per character, the time of ``loss.backward()`` and of the whole step, and
under meSimp the MLP widths. ``comparison_configs`` is the set behind ``mebp train --task lm``.
"""

import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import MODES, resolve_k
from ..modules import convert
from .train import _sync, mean_std, progress_bar, resolve_device, timed_backward

LM_MODES = ("dense",) + MODES
LM_OPTIMIZERS = ("adamw",)
VALIDATION_FRACTION = 0.1


# ---------------------------------------------------------------------------------------------
# The text


@dataclass
class CharCorpus:
    """Training and validation text as int64 character ids, and the characters they index."""

    train: torch.Tensor
    validation: torch.Tensor
    chars: str
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def describe(self) -> str:
        return (
            f"{self.source}: {len(self.train):,} training and {len(self.validation):,} "
            f"validation characters, {self.vocab_size} distinct"
        )


def load_pydoc_topics(validation_fraction: float = VALIDATION_FRACTION) -> CharCorpus:
    """The ``pydoc_data.topics`` text, split at a fixed character position."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:  # some distributions strip it
        raise ImportError(
            f"the standard library's pydoc_data package is missing ({error}); the "
            "lm task needs its text"
        ) from None
    text = "\n\n".join(topics[name] for name in sorted(topics))
    return corpus_from_text(text, validation_fraction, "pydoc_data.topics")


def corpus_from_text(
    text: str, validation_fraction: float = VALIDATION_FRACTION, source: str = "text"
) -> CharCorpus:
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    chars = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    cut = int(round(len(ids) * (1.0 - validation_fraction)))
    if cut < 2 or len(ids) - cut < 2:
        raise ValueError(f"the text ({len(ids)} characters) is too short to split")
    return CharCorpus(ids[:cut], ids[cut:], chars, source)


# ---------------------------------------------------------------------------------------------
# The model (written so that torch.fx traces it: the Simplifier must see the MLPs)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final norm and the output layer.

    ``arch="gpt"``: the blocks above (attention from nn.Linear); ``arch="torch"``: an
    ``nn.TransformerEncoder`` of pre-norm ``nn.TransformerEncoderLayer`` with a causal mask.
    """

    def __init__(
        self,
        vocab: int,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        context: int = 64,
        mlp_ratio: int = 4,
        arch: str = "gpt",
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        if arch not in ("gpt", "torch"):
            raise ValueError(f"arch must be 'gpt' or 'torch', got {arch!r}")
        self.context, self.arch = context, arch
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        if arch == "gpt":
            self.blocks = nn.ModuleList(
                Block(width, heads, mlp_ratio * width) for _ in range(layers)
            )
        else:
            layer = nn.TransformerEncoderLayer(
                width,
                heads,
                mlp_ratio * width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.register_buffer(
                "causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False
            )
        self.ln = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, tokens):
        length = tokens.shape[1]
        x = self.token(tokens) + self.position.weight[:length]
        if self.arch == "gpt":
            for block in self.blocks:
                x = block(x)
        else:
            mask = self.causal.narrow(0, 0, length).narrow(1, 0, length)
            x = self.blocks(x, mask=mask, is_causal=True)
        return self.lm_head(self.ln(x))


def mlp_widths(model: nn.Module) -> list[int]:
    """The hidden width of each block's MLP."""
    return [
        m.out_features
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.endswith(("mlp.0", "linear1"))
    ]


# ---------------------------------------------------------------------------------------------
# Settings and one run


@dataclass
class LMConfig:
    """One setting. ``k``: count or ratio of each converted projection's outputs (as in
    ``convert``); ``attention_k``: another ``k`` for the attention projections (1.0 keeps them on
    exact back propagation); ``exclude``: more name patterns of projections left dense (the
    lm head always is). ``sparse_grad``: row-sparse gradients into ``RowAdamW``; otherwise
    ``torch.optim.AdamW`` gets dense (zero-filled) gradients. ``simplify``: meSimp prunes each
    block's MLP hidden neurons selected in fewer than ``threshold`` of the tokens, every
    ``prune_every`` steps during the first ``prune_fraction`` of the steps."""

    mode: str = "dense"
    k: float = 0.05
    attention_k: float | None = None
    exclude: tuple = ()
    optimizer: str = "adamw"
    sparse_grad: bool = False
    simplify: bool = False
    threshold: float = 0.1
    prune_fraction: float = 0.5
    prune_every: int = 50
    arch: str = "gpt"
    width: int = 128
    layers: int = 2
    heads: int = 4
    context: int = 64
    batch_size: int = 16
    steps: int = 300
    lr: float = 2e-3
    eval_every: int = 50
    eval_tokens: int = 16384
    label: str = ""

    def __post_init__(self):
        if self.mode not in LM_MODES:
            raise ValueError(f"mode must be one of {LM_MODES}, got {self.mode!r}")
        if self.optimizer not in LM_OPTIMIZERS:
            raise ValueError(
                f"the lm task trains with {LM_OPTIMIZERS} (row-sparse: --sparse-grad), "
                f"got {self.optimizer!r}"
            )
        for name in (
            "width",
            "layers",
            "heads",
            "context",
            "batch_size",
            "steps",
            "eval_every",
            "eval_tokens",
            "prune_every",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.mode != "dense":
            resolve_k(self.k, self.width, "the narrowest projection (width)")
            if self.attention_k is not None:
                resolve_k(self.attention_k, self.width, "the attention output projection (width)")
        elif self.sparse_grad or self.simplify or self.attention_k is not None or self.exclude:
            raise ValueError(
                "sparse_grad, simplify, attention_k and exclude need a meProp mode "
                "(unified or per_example)"
            )
        if self.simplify and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 < self.prune_fraction <= 1.0:
            raise ValueError(f"prune_fraction must be in (0, 1], got {self.prune_fraction}")
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)
        if not self.label:
            self.label = self.default_label()

    def default_label(self) -> str:
        if self.mode == "dense":
            name = "dense"
        else:
            name = ("meSimp " if self.simplify else "meProp ") + self.mode.replace("_", "-")
            name += f" k={_percent(self.k, self.width)}"
            if self.attention_k is not None:
                name += (
                    " (attention dense)"
                    if self.attention_k == 1.0
                    else f" (attention k={_percent(self.attention_k, self.width)})"
                )
            if self.exclude:
                name += f" (dense: {' '.join(self.exclude)})"
        return name + (", RowAdamW" if self.sparse_grad else ", AdamW")

    @property
    def k_ratio(self) -> float:
        """k as a share of a projection's outputs (1.0 for dense)."""
        if self.mode == "dense":
            return 1.0
        return self.k if isinstance(self.k, float) else self.k / self.width


def _percent(k, width) -> str:
    return f"{100 * k:g}%" if isinstance(k, float) else str(k)


def build_model(config: LMConfig, vocab: int) -> nn.Module:
    return CharTransformer(
        vocab, config.width, config.layers, config.heads, config.context, arch=config.arch
    )


def make_lm_optimizer(config: LMConfig, model: nn.Module):
    if config.sparse_grad:
        from ..optim import RowAdamW

        return RowAdamW(model.parameters(), lr=config.lr)
    return torch.optim.AdamW(model.parameters(), lr=config.lr)


def _windows(ids: torch.Tensor, starts: torch.Tensor, context: int):
    offsets = torch.arange(context + 1)
    chunk = ids[starts.unsqueeze(1) + offsets]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def validation_loss(
    model: nn.Module, ids: torch.Tensor, context: int, max_tokens: int, device, batch: int = 64
) -> float:
    """Mean cross-entropy (nats per character) over consecutive non-overlapping windows of the
    validation text, at most ``max_tokens`` predicted characters (the same ones every time)."""
    was_training = model.training
    model.eval()
    n_windows = max(1, min((len(ids) - 1) // context, max_tokens // context))
    starts = torch.arange(n_windows) * context
    total, count = 0.0, 0
    for i in range(0, n_windows, batch):
        x, y = _windows(ids, starts[i : i + batch], context)
        logits = model(x.to(device))
        total += float(
            F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum")
        )
        count += y.numel()
    model.train(was_training)
    return total / count


class LMRun:
    """One setting being trained, one ``step()`` at a time (``train_lm`` runs it to the end;
    ``run_lm_experiment`` steps several in turn, so that their timings share the machine's
    conditions). ``result()`` gives the measurements (see the module docstring)."""

    def __init__(self, config: LMConfig, corpus: CharCorpus, seed: int = 0, device="cpu"):
        device = resolve_device(device) if isinstance(device, str) else device
        for part, ids in (("training", corpus.train), ("validation", corpus.validation)):
            if len(ids) <= config.context + 1:
                raise ValueError(
                    f"the {part} text ({len(ids)} characters) is shorter than the "
                    f"context {config.context} + 1"
                )
        self.config, self.corpus, self.seed, self.device = config, corpus, seed, device
        torch.manual_seed(seed)
        model = build_model(config, corpus.vocab_size)
        self.conversion = None
        if config.mode != "dense":
            model, self.conversion = convert(
                model,
                k=config.k,
                attention_k=config.attention_k,
                mode=config.mode,
                grad="sparse" if config.sparse_grad else "dense",
                exclude=("lm_head",) + config.exclude,
                inplace=True,
                report=True,
            )
        self.model = model.to(device)
        self.optimizer = make_lm_optimizer(config, model)
        self.simplifier = None
        if config.simplify:
            from ..simplify import Simplifier

            self.simplifier = Simplifier(
                model,
                threshold=config.threshold,
                optimizer=self.optimizer,
                min_width=resolve_k(config.k, 4 * config.width),
            )
        self.prune_until = int(config.steps * config.prune_fraction) if config.simplify else 0
        self.initial_widths = mlp_widths(model)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_done = 0
        self.evals, self.backward_times, self.step_times, self.losses, self.prunes = (
            [],
            [],
            [],
            [],
            [],
        )
        model.train()

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.config.steps

    def step(self):
        """One training step; returns the evaluation record when it evaluated, else None."""
        config, model, device = self.config, self.model, self.device
        high = len(self.corpus.train) - config.context - 1
        starts = torch.randint(0, high + 1, (config.batch_size,), generator=self.generator)
        x, y = _windows(self.corpus.train, starts, config.context)
        x, y = x.to(device), y.to(device)
        _sync(device)
        started = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        self.backward_times.append(timed_backward(loss, device))
        self.optimizer.step()
        _sync(device)
        self.step_times.append(time.perf_counter() - started)
        self.losses.append(float(loss.detach()))
        self.steps_done += 1
        step = self.steps_done
        if (
            self.simplifier is not None
            and step <= self.prune_until
            and step % config.prune_every == 0
        ):
            self.simplifier.prune()
            self.prunes.append(dict(step=step, widths=mlp_widths(model)))
        if step % config.eval_every == 0 or step == config.steps:
            val = validation_loss(
                model, self.corpus.validation, config.context, config.eval_tokens, device
            )
            record = dict(
                step=step,
                train_loss=statistics.fmean(self.losses[-config.eval_every :]),
                val_loss=val,
                val_bpc=val / math.log(2),
                widths=mlp_widths(model),
            )
            self.evals.append(record)
            return record
        return None

    def result(self) -> dict:
        config, last = self.config, self.evals[-1]
        warm = max(1, len(self.step_times) // 10)  # the first steps warm up (allocations)
        conversion = self.conversion
        return dict(
            label=config.label,
            seed=self.seed,
            config=dataclasses.asdict(config),
            device=str(self.device),
            k_ratio=config.k_ratio,
            val_loss=last["val_loss"],
            val_bpc=last["val_bpc"],
            train_loss=last["train_loss"],
            backward_s=statistics.median(self.backward_times[warm:]),
            step_s=statistics.median(self.step_times[warm:]),
            initial_widths=self.initial_widths,
            widths=mlp_widths(self.model),
            params=sum(p.numel() for p in self.model.parameters()),
            converted=dict(conversion.converted) if conversion is not None else {},
            dense=dict(conversion.dense) if conversion is not None else {},
            evals=self.evals,
            prunes=self.prunes,
        )


def train_lm(
    config: LMConfig, corpus: CharCorpus, seed: int = 0, device="cpu", on_eval=None
) -> dict:
    """Trains one setting; returns its measurements (see the module docstring).
    ``on_eval(record)`` is called at each evaluation (progress display)."""
    run = LMRun(config, corpus, seed, device)
    while not run.finished:
        record = run.step()
        if record is not None and on_eval is not None:
            on_eval(record)
    return run.result()


# ---------------------------------------------------------------------------------------------
# Several settings


def summarize_lm(label: str, runs: list[dict]) -> dict:
    summary = dict(
        label=label,
        config=runs[0]["config"],
        k_ratio=runs[0]["k_ratio"],
        seeds=[r["seed"] for r in runs],
        device=runs[0]["device"],
        initial_widths=runs[0]["initial_widths"],
        converted=runs[0]["converted"],
        dense=runs[0]["dense"],
        runs=runs,
    )
    for key in ("val_loss", "val_bpc", "backward_s", "step_s"):
        summary[f"{key}_mean"], summary[f"{key}_std"] = mean_std(r[key] for r in runs)
    summary["widths_mean"] = [statistics.fmean(ws) for ws in zip(*(r["widths"] for r in runs))]
    summary["params_mean"] = statistics.fmean(r["params"] for r in runs)
    return summary


def add_lm_comparisons(summaries: list[dict]) -> list[dict]:
    """Each row's bits-per-character gap and backward / step speedups against the dense run of
    the same model size, steps and learning rate."""
    shape = ("arch", "width", "layers", "heads", "context", "batch_size", "steps", "lr")
    key = lambda c: tuple(c[name] for name in shape)
    baselines = {key(s["config"]): s for s in summaries if s["config"]["mode"] == "dense"}
    for s in summaries:
        base = baselines.get(key(s["config"]))
        s["baseline"] = base["label"] if base else None
        s["bpc_gap"] = s["val_bpc_mean"] - base["val_bpc_mean"] if base else None
        s["backward_speedup"] = base["backward_s_mean"] / s["backward_s_mean"] if base else None
        s["step_speedup"] = base["step_s_mean"] / s["step_s_mean"] if base else None
    return summaries


def run_lm_experiment(configs, corpus, seeds=(0,), device="cpu", progress=True) -> list[dict]:
    """Trains every config with every seed; one summary per config (``summarize_lm``). The
    settings of one seed train in lockstep, one step each in turn, so that a machine whose load
    changes over time (a shared one) slows them alike and their timings stay comparable."""
    configs, seeds = list(configs), list(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"config labels must be distinct, got {labels}")
    device = resolve_device(device) if isinstance(device, str) else device
    bar = progress_bar(sum(c.steps for c in configs) * len(seeds), progress, unit="step")
    results = {c.label: [] for c in configs}
    try:
        for seed in seeds:
            bar.set_description(f"{len(configs)} settings in turn (seed {seed})")
            runs = [LMRun(config, corpus, seed, device) for config in configs]
            while not all(run.finished for run in runs):
                for run in runs:
                    if run.finished:
                        continue
                    record = run.step()
                    bar.update(1)
                    if record is not None:
                        bar.set_postfix(
                            setting=run.config.label[:24], bpc=f"{record['val_bpc']:.3f}"
                        )
            for run in runs:
                results[run.config.label].append(run.result())
                run.model = run.optimizer = run.simplifier = None  # free the memory
    finally:
        bar.close()
    summaries = []
    for config in configs:
        summary = summarize_lm(config.label, results[config.label])
        summaries.append(summary)
        if progress:
            print(
                f"{config.label}: validation {summary['val_bpc_mean']:.3f} bits/char (loss "
                f"{summary['val_loss_mean']:.3f}), backward {1e3 * summary['backward_s_mean']:.1f}"
                f" ms, step {1e3 * summary['step_s_mean']:.1f} ms, MLP "
                f"{'/'.join(f'{w:.0f}' for w in summary['widths_mean'])}"
            )
    return add_lm_comparisons(summaries)


def comparison_configs(ks=(0.05, 0.1, 0.25), adamw_ks=(0.05, 0.25), mesimp_k=0.05, **common):
    """The runs behind ``mebp train --task lm``: dense AdamW; meProp unified at ``adamw_ks`` with
    AdamW (zero-filled dense gradients) and at ``ks`` with RowAdamW (row-sparse gradients);
    meProp on the MLPs only (attention exact) at the smallest k; meSimp at ``mesimp_k``."""
    configs = [LMConfig(mode="dense", **common)]
    configs += [LMConfig(mode="unified", k=k, **common) for k in adamw_ks]
    configs += [LMConfig(mode="unified", k=k, sparse_grad=True, **common) for k in ks]
    configs.append(LMConfig(mode="unified", k=min(ks), attention_k=1.0, sparse_grad=True, **common))
    configs.append(LMConfig(mode="unified", k=mesimp_k, sparse_grad=True, simplify=True, **common))
    return configs


# ---------------------------------------------------------------------------------------------
# Report: table, CSV, JSON and charts (the MLP demo's machinery)

LM_COLUMNS = (
    "setting",
    "val bits/char",
    "vs dense",
    "val loss (nats)",
    "backward ms",
    "speedup",
    "step ms",
    "speedup",
    "MLP widths",
    "params",
)


def lm_table_rows(summaries) -> list[list[str]]:
    rows = []
    for s in summaries:
        dense = s["config"]["mode"] == "dense"
        pm = lambda key, fmt: (
            f"{s[key + '_mean']:{fmt}} ± {s[key + '_std']:{fmt}}"
            if len(s["seeds"]) > 1
            else f"{s[key + '_mean']:{fmt}}"
        )
        speed = lambda key: "n/a" if s.get(key) is None else f"{s[key]:.2f}×"
        rows.append(
            [
                s["label"],
                pm("val_bpc", ".3f"),
                "baseline"
                if dense
                else ("n/a" if s.get("bpc_gap") is None else f"{s['bpc_gap']:+.3f}"),
                pm("val_loss", ".3f"),
                f"{1e3 * s['backward_s_mean']:.1f}",
                speed("backward_speedup"),
                f"{1e3 * s['step_s_mean']:.1f}",
                speed("step_speedup"),
                "/".join(f"{w:.0f}" for w in s["widths_mean"]),
                f"{s['params_mean']:,.0f}",
            ]
        )
    return rows


LM_CSV_FIELDS = (
    "label",
    "mode",
    "k",
    "attention_k",
    "optimizer",
    "sparse_grad",
    "simplify",
    "threshold",
    "arch",
    "width",
    "layers",
    "heads",
    "context",
    "batch_size",
    "steps",
    "lr",
    "seeds",
    "device",
    "val_loss_mean",
    "val_loss_std",
    "val_bpc_mean",
    "val_bpc_std",
    "bpc_gap",
    "backward_s_mean",
    "backward_speedup",
    "step_s_mean",
    "step_speedup",
    "initial_widths",
    "widths_mean",
    "params_mean",
)


def write_lm_csv(path, summaries) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LM_CSV_FIELDS)
        writer.writeheader()
        for s in summaries:
            c = s["config"]
            row = {name: c.get(name) for name in LM_CSV_FIELDS if name in c}
            row.update(
                label=s["label"],
                seeds=" ".join(map(str, s["seeds"])),
                device=s["device"],
                initial_widths=" ".join(map(str, s["initial_widths"])),
                widths_mean=" ".join(f"{w:.1f}" for w in s["widths_mean"]),
                params_mean=f"{s['params_mean']:.0f}",
            )
            for key in (
                "val_loss_mean",
                "val_loss_std",
                "val_bpc_mean",
                "val_bpc_std",
                "backward_s_mean",
                "step_s_mean",
            ):
                row[key] = f"{s[key]:.6f}"
            for key in ("bpc_gap", "backward_speedup", "step_speedup"):
                row[key] = "" if s.get(key) is None else f"{s[key]:.4f}"
            if c["mode"] == "dense":
                row["k"] = ""
            writer.writerow(row)


def chart_bpc_vs_k(path, summaries) -> bool:
    """Validation bits per character against k, one curve per optimizer; dense as a line."""
    from .report import _pyplot, save_figure

    curves = {}
    for s in summaries:
        c = s["config"]
        if c["mode"] != "dense" and not c["simplify"] and c["attention_k"] is None:
            curves.setdefault("RowAdamW" if c["sparse_grad"] else "AdamW", []).append(s)
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in sorted(curves.items()):
        runs.sort(key=lambda s: s["k_ratio"])
        ax.errorbar(
            [100 * s["k_ratio"] for s in runs],
            [s["val_bpc_mean"] for s in runs],
            yerr=[s["val_bpc_std"] for s in runs],
            marker="o",
            capsize=3,
            label=f"meProp unified, {name}",
        )
    for s in summaries:
        c = s["config"]
        if c["mode"] == "dense":
            ax.axhline(
                s["val_bpc_mean"],
                linestyle="--",
                color="gray",
                linewidth=1,
                label=f"{s['label']} {s['val_bpc_mean']:.3f}",
            )
        elif c["simplify"] or c["attention_k"] is not None:
            ax.plot(
                [100 * s["k_ratio"]],
                [s["val_bpc_mean"]],
                marker="s",
                linestyle="none",
                label=s["label"],
            )
    ax.set_xscale("log")
    ticks = sorted({100 * s["k_ratio"] for s in summaries if s["config"]["mode"] != "dense"})
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("k (% of each projection's outputs kept in backward, log scale)")
    ax.set_ylabel("validation bits per character")
    ax.set_title("Character-level transformer: validation bits/char against k")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def chart_validation_curves(path, summaries) -> bool:
    from .report import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        runs = s["runs"]
        steps = [e["step"] for e in runs[0]["evals"]]
        curve = [
            statistics.fmean(r["evals"][i]["val_bpc"] for r in runs) for i in range(len(steps))
        ]
        ax.plot(
            steps,
            curve,
            label=s["label"],
            linestyle="--" if s["config"]["mode"] == "dense" else "-",
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per character")
    ax.set_title("Validation bits/char through training (mean over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def chart_timings(path, summaries) -> bool:
    from .report import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(summaries) + 1.5))
    labels = [s["label"] for s in summaries]
    ys = range(len(summaries))
    ax.barh(
        [y + 0.2 for y in ys],
        [1e3 * s["step_s_mean"] for s in summaries],
        height=0.4,
        label="whole step (forward, backward, optimizer)",
    )
    ax.barh(
        [y - 0.2 for y in ys],
        [1e3 * s["backward_s_mean"] for s in summaries],
        height=0.4,
        label="loss.backward()",
    )
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (median)")
    ax.set_title("Time per training step", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def chart_mlp_widths(path, summaries) -> bool:
    simplified = [s for s in summaries if s["config"]["simplify"]]
    if not simplified:
        return False
    from .report import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in simplified:
        run = s["runs"][0]
        points = [(0, run["initial_widths"])] + [(p["step"], p["widths"]) for p in run["prunes"]]
        points.append((run["config"]["steps"], run["widths"]))
        for block in range(len(run["initial_widths"])):
            ax.step(
                [p[0] for p in points],
                [p[1][block] for p in points],
                where="post",
                marker=".",
                label=f"{s['label']}: block {block + 1}",
            )
    ax.set_xlabel("training step")
    ax.set_ylabel("MLP hidden width (neurons)")
    ax.set_title("meSimp: MLP hidden width through training (first seed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_lm_report(out_dir, summaries, *, meta=None) -> dict:
    """results.json, results.csv, table.md and PNG charts in ``out_dir``; ``{name: path}``."""
    from .report import format_markdown_table, write_json

    os.makedirs(out_dir, exist_ok=True)
    written = {}
    written["json"] = os.path.join(out_dir, "results.json")
    write_json(written["json"], dict(meta=meta or {}, table=summaries))
    written["csv"] = os.path.join(out_dir, "results.csv")
    write_lm_csv(written["csv"], summaries)
    written["table"] = os.path.join(out_dir, "table.md")
    with open(written["table"], "w") as f:
        f.write(format_markdown_table(LM_COLUMNS, lm_table_rows(summaries)) + "\n")
    charts = {
        "bpc_vs_k": chart_bpc_vs_k,
        "validation_curves": chart_validation_curves,
        "step_times": chart_timings,
        "mlp_width": chart_mlp_widths,
    }
    for name, draw in charts.items():
        path = os.path.join(out_dir, f"{name}.png")
        if draw(path, summaries):
            written[name] = path
    return written
