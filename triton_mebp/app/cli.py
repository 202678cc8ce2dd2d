"""Command line: ``python -m triton_mebp COMMAND`` (also installed as ``mebp``).

Commands: ``demo`` (meProp and meSimp on the bundled digits, with a report), ``train`` (any
setting, on digits or MNIST; ``--task pos`` for the LSTM tagger, ``--task window`` for the window
MLP tagger, ``--task lm`` for a character-level transformer), ``sweep`` and ``plot`` (kernel
benchmarks and their charts), ``version``.
"""

import argparse
import csv
import os
import sys
import time
from pathlib import Path

# What a user's input can cause (files, folders, values); anything else is a bug to report.
USER_ERRORS = (ValueError, OSError, ImportError, UnicodeDecodeError, csv.Error)


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def user_error(command: str, error: BaseException) -> int:
    """Prints ``error`` as one line on stderr; returns the exit status 2."""
    text = " ".join(str(error).split()) or type(error).__name__
    print(f"mebp {command}: error: {text}", file=sys.stderr)
    return 2


def check_out(out) -> None:
    """Fails now, not after training, if the output folder cannot be created or written to
    (creates nothing: the folder is made when the results are written)."""
    folder = Path(out).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        where = "exists and is not a folder" if existing == folder else f"{existing} is a file"
        raise NotADirectoryError(f"--out {out}: {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: no permission to write in {existing}")


def parse_k(text: str):
    """``25`` -> the count 25; ``0.05`` or ``5%`` -> the ratio 0.05 of the hidden width."""
    try:
        if text.endswith("%"):
            value = float(text[:-1]) / 100.0
        elif text.strip().lstrip("+").isdigit():
            if int(text) < 1:
                raise ValueError
            return int(text)
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"k must be an int count (25), a ratio (0.05) or a percentage (5%), got {text!r}"
        ) from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"k as a ratio must be in (0, 1], got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _add_common(p, out_default, threads_default=None):
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available; default)"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=threads_default,
        help="CPU threads for PyTorch"
        + (
            f" (default {threads_default}: at batch 10 the "
            "products are tiny and more threads cost more in synchronization than they "
            "save, badly so on a shared machine)"
            if threads_default
            else " (default: PyTorch's choice)"
        ),
    )
    p.add_argument(
        "--out",
        default=out_default,
        help=f"folder for results.json/.csv, table.md and PNG charts (default {out_default})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .train import OPTIMIZERS, TRAIN_MODES

    parser = CommandParser(
        prog="mebp",
        description="minimal-effort back propagation (meProp) and model simplification (meSimp)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the version")

    demo = sub.add_parser(
        "demo",
        help="meProp and meSimp against dense training on the bundled "
        "digits dataset: table, CSV/JSON and charts",
        description="Trains the paper's MLP (2 hidden layers of 500) on "
        "scikit-learn's digits with AdaGrad and Adam: dense, meProp unified and "
        "per-example at k = 5%%, meSimp; then a k sweep and a one-layer backward "
        "benchmark.",
    )
    demo.add_argument("--epochs", type=_positive_int, default=15)
    demo.add_argument("--hidden", type=_positive_int, default=500)
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    demo.add_argument("--k", type=parse_k, default=0.05, help="k of the main rows (default 5%%)")
    demo.add_argument("--batch-size", type=_positive_int, default=10)
    demo.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="zero-mean, unit-variance inputs (training-set statistics; default); "
        "--no-standardize feeds pixels scaled to [0, 1] (docs/demo.md)",
    )
    demo.add_argument("--no-sweep", action="store_true", help="skip the k sweep")
    demo.add_argument("--no-benchmark", action="store_true", help="skip the one-layer benchmark")
    demo.add_argument("--benchmark-width", type=_positive_int, default=2048)
    demo.add_argument("--benchmark-batch", type=_positive_int, default=256)
    _add_common(demo, "mebp-demo", threads_default=1)

    train = sub.add_parser(
        "train",
        help="train with chosen settings (MLP on digits/MNIST, the "
        "POS tagger with --task pos or --task window, a character-level "
        "transformer with --task lm)",
    )
    train.add_argument(
        "--task",
        choices=("mlp", "pos", "window", "lm"),
        default="mlp",
        help="mlp (digits/MNIST), pos (the LSTM tagger), window (the window MLP "
        "tagger: best epoch by held-out accuracy, test accuracy there) or lm",
    )
    train.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    train.add_argument("--data-dir", help="MNIST: folder with the four IDX files (.gz or not)")
    train.add_argument(
        "--standardize",
        action="store_true",
        help="zero-mean, unit-variance inputs (training-set statistics) instead of "
        "pixels scaled to [0, 1]; meProp with Adam needs it (see the README)",
    )
    train.add_argument(
        "--mode",
        nargs="+",
        choices=TRAIN_MODES,
        help="one or more of dense, unified, per_example (each is trained; default unified)",
    )
    train.add_argument(
        "--k",
        type=parse_k,
        nargs="+",
        help="one or more k: int count, ratio (0.05) or percentage (5%%) (default 5%%)",
    )
    train.add_argument("--hidden", type=_positive_int, default=500)
    train.add_argument(
        "--layers",
        type=_positive_int,
        help="hidden layers (MLP, default 2) or transformer blocks (lm, default 2)",
    )
    train.add_argument("--epochs", type=_positive_int, default=20)
    train.add_argument("--batch-size", type=_positive_int, help="default 10 (MLP), 16 (lm)")
    train.add_argument(
        "--optimizer",
        nargs="+",
        choices=OPTIMIZERS + ("adamw",),
        help="default adagrad (MLP); the lm task trains with adamw",
    )
    train.add_argument(
        "--lr", type=float, help="learning rate (default: adam 1e-3, adagrad 0.1, sgd 0.1; lm 2e-3)"
    )
    train.add_argument("--eps", type=float, help="epsilon of adam or adagrad (default: theirs)")
    train.add_argument(
        "--sparse-grad",
        action="store_true",
        help="row-sparse weight gradients "
        "and the row-sparse optimizers (only selected rows are updated)",
    )
    train.add_argument(
        "--simplify",
        action="store_true",
        help="meSimp: prune rarely selected hidden neurons (meProp modes only)",
    )
    train.add_argument(
        "--threshold",
        type=float,
        default=0.1,
        help="meSimp: prune neurons selected in fewer than this fraction of examples (default 0.1)",
    )
    train.add_argument(
        "--prune-fraction",
        type=float,
        default=0.5,
        help="meSimp: prune after each epoch in this first fraction of training (default 0.5)",
    )
    train.add_argument("--seeds", type=int, nargs="+", default=[0])
    train.add_argument("--train", dest="train_file", help="pos/window: training file (CoNLL-U)")
    train.add_argument(
        "--dev",
        dest="dev_file",
        help="pos/window: development file (window: "
        "default, every 10th training sentence is held out to pick the epoch)",
    )
    train.add_argument("--test", dest="test_file", help="pos/window: test file")
    train.add_argument("--embedding-dim", type=_positive_int, default=100, help="POS only")
    lm = train.add_argument_group(
        "--task lm",
        "a causal character-level transformer on the "
        "pydoc_data topics text; without --mode, --k, --sparse-grad, "
        "--simplify or --attention-k it trains the comparison set "
        "(dense, meProp at several k with AdamW and RowAdamW, meSimp)",
    )
    lm.add_argument("--width", type=_positive_int, default=128, help="model width (default 128)")
    lm.add_argument("--heads", type=_positive_int, default=4, help="attention heads (default 4)")
    lm.add_argument(
        "--context", type=_positive_int, default=64, help="characters per window (default 64)"
    )
    lm.add_argument("--steps", type=_positive_int, default=300, help="training steps (default 300)")
    lm.add_argument(
        "--eval-every",
        type=_positive_int,
        default=50,
        help="steps between validation passes (default 50)",
    )
    lm.add_argument(
        "--eval-tokens",
        type=_positive_int,
        default=16384,
        help="validation characters scored (default 16384)",
    )
    lm.add_argument(
        "--attention-k",
        type=parse_k,
        help="k of the attention projections (default: --k; 100%% keeps them exact)",
    )
    lm.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="PATTERN",
        help="name patterns "
        "of projections to keep dense (e.g. '*.attn.proj' '*.mlp.2'; the lm head "
        "always is)",
    )
    lm.add_argument(
        "--arch",
        choices=("gpt", "torch"),
        default="gpt",
        help="blocks built from nn.Linear (gpt) or nn.TransformerEncoderLayer (torch)",
    )
    lm.add_argument(
        "--prune-every",
        type=_positive_int,
        default=50,
        help="meSimp: steps between prunes (default 50)",
    )
    _add_common(train, "mebp-train")

    for name, text in (
        ("sweep", "kernel benchmark sweep (arguments go to triton_mebp.bench.sweep)"),
        ("plot", "charts from sweep results (arguments go to triton_mebp.bench.plot)"),
    ):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _report(summaries, out, *, extra=None, benchmark=None, meta=None):
    from .report import format_table, write_report

    print()
    print(format_table(summaries))
    if out:
        written = write_report(out, summaries, extra=extra, benchmark=benchmark, meta=meta)
        print(f"\nwrote {', '.join(sorted(written.values()))}")


def _meta(dataset, device, seeds, started_at):
    import torch

    from .. import __version__, backend
    from ..bench.harness import cpu_model

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return dict(
        dataset=dataset.describe(),
        device=str(device),
        device_name=name,
        torch=torch.__version__,
        triton_mebp=__version__,
        backend=backend.get_backend(),
        cpu_threads=torch.get_num_threads(),
        seeds=list(seeds),
        date=started_at,
    )


def _set_threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def run_demo(args) -> int:
    from .data import load_digits
    from .train import (
        add_comparisons,
        benchmark_backward,
        demo_configs,
        resolve_device,
        run_experiment,
    )

    device = resolve_device(args.device)
    _set_threads(args)
    dataset = load_digits()
    if args.standardize:
        dataset = dataset.standardized()
    print(f"{dataset.describe()}; device {device}; seeds {args.seeds}")
    started = time.perf_counter()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    main, sweep = demo_configs(
        epochs=args.epochs, hidden=args.hidden, k_ratio=args.k, batch_size=args.batch_size
    )
    progress = not args.no_progress
    summaries = run_experiment(main, dataset, seeds=args.seeds, device=device, progress=progress)
    extra = []
    if not args.no_sweep and sweep:
        extra = run_experiment(
            sweep, dataset, seeds=args.seeds[:1], device=device, progress=progress
        )
        dense = [s for s in summaries if s["config"]["mode"] == "dense"]
        extra = [s for s in add_comparisons(dense + extra) if s not in dense]
    benchmark = None
    if not args.no_benchmark:
        benchmark = benchmark_backward(args.benchmark_width, args.benchmark_batch, device=device)
    meta = _meta(dataset, device, args.seeds, started_at)
    _report(summaries, args.out, extra=extra, benchmark=benchmark, meta=meta)
    if extra:
        print(f"\nk sweep (meProp unified, AdaGrad, seed {args.seeds[0]}):")
        for s in sorted(extra, key=lambda s: s["config"]["k"]):
            print(
                f"  {s['label']}: {s['test_acc_mean']:.2f}% ({s['gap_to_dense']:+.2f} vs dense), "
                f"backward {s['backward_s_mean']:.3f} s/epoch ({s['speedup']:.2f}×)"
            )
    if benchmark:
        r0 = benchmark[0]
        print(
            f"\nbackward of one {r0['width']}x{r0['width']} layer, batch {r0['batch']}: dense "
            f"{1e3 * r0['backward_s']:.2f} ms"
        )
        for r in benchmark[1:]:
            print(
                f"  {r['mode']:<11} k={r['k']:<5} {1e3 * r['backward_s']:8.2f} ms  "
                f"{r['speedup']:.2f}×"
            )
    print(
        f"\nmeasured in {time.perf_counter() - started:.0f} s on {meta['device']} "
        f"({meta['device_name']})"
    )
    return 0


MLP_DEFAULTS = dict(mode=["unified"], k=[0.05], optimizer=["adagrad"], batch_size=10, layers=2)


def run_train(args) -> int:
    from .data import load_dataset
    from .train import TrainConfig, resolve_device, run_experiment

    device = resolve_device(args.device)
    _set_threads(args)
    if args.task == "lm":
        return _run_lm(args, device)
    for name, value in MLP_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.task == "pos":
        return _run_pos(args, device)
    if args.task == "window":
        return _run_window(args, device)
    dataset = load_dataset(args.dataset, args.data_dir)
    if args.standardize:
        dataset = dataset.standardized()
    configs = []
    for optimizer in args.optimizer:
        common = dict(
            hidden=args.hidden,
            layers=args.layers,
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=optimizer,
            lr=args.lr,
            eps=args.eps,
            sparse_grad=args.sparse_grad,
        )
        if "dense" in args.mode:
            configs.append(TrainConfig(mode="dense", **common))
        for mode in (m for m in args.mode if m != "dense"):
            for k in args.k:
                configs.append(
                    TrainConfig(
                        mode=mode,
                        k=k,
                        simplify=args.simplify,
                        threshold=args.threshold,
                        prune_fraction=args.prune_fraction,
                        **common,
                    )
                )
    if args.simplify and all(m == "dense" for m in args.mode):
        raise ValueError("--simplify needs --mode unified or per_example")
    print(f"{dataset.describe()}; device {device}; seeds {args.seeds}")
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    summaries = run_experiment(
        configs, dataset, seeds=args.seeds, device=device, progress=not args.no_progress
    )
    _report(summaries, args.out, meta=_meta(dataset, device, args.seeds, started_at))
    return 0


def _run_lm(args, device) -> int:
    from .lm import LMConfig, comparison_configs, load_pydoc_topics, run_lm_experiment

    if args.optimizer and set(args.optimizer) != {"adamw"}:
        raise ValueError("--task lm trains with adamw (--sparse-grad: the row-sparse RowAdamW)")
    common = dict(
        arch=args.arch,
        width=args.width,
        layers=args.layers or 2,
        heads=args.heads,
        context=args.context,
        batch_size=args.batch_size or 16,
        steps=args.steps,
        lr=args.lr or 2e-3,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        threshold=args.threshold,
        prune_fraction=args.prune_fraction,
        prune_every=args.prune_every,
    )
    chosen = (
        args.mode,
        args.k,
        args.attention_k,
        args.sparse_grad or None,
        args.simplify or None,
        args.exclude or None,
    )
    if all(option is None for option in chosen):
        configs = comparison_configs(**common)
    else:
        configs = []
        for mode in args.mode or ["unified"]:
            if mode == "dense":
                configs.append(LMConfig(mode="dense", **common))
                continue
            for k in args.k or [0.05]:
                configs.append(
                    LMConfig(
                        mode=mode,
                        k=k,
                        attention_k=args.attention_k,
                        exclude=tuple(args.exclude),
                        sparse_grad=args.sparse_grad,
                        simplify=args.simplify,
                        **common,
                    )
                )
    corpus = load_pydoc_topics()
    print(f"{corpus.describe()}; device {device}; seeds {args.seeds}")
    started = time.perf_counter()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    summaries = run_lm_experiment(
        configs, corpus, seeds=args.seeds, device=device, progress=not args.no_progress
    )
    from .lm import LM_COLUMNS, lm_table_rows, write_lm_report
    from .report import format_markdown_table

    print()
    print(format_markdown_table(LM_COLUMNS, lm_table_rows(summaries)))
    meta = _meta(corpus, device, args.seeds, started_at)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    if args.out:
        written = write_lm_report(args.out, summaries, meta=meta)
        print(f"\nwrote {', '.join(sorted(written.values()))}")
    print(
        f"\nmeasured in {meta['wall_s']:.0f} s on {meta['device']} ({meta['device_name']}, "
        f"{meta['cpu_threads']} threads)"
    )
    return 0


def _run_pos(args, device) -> int:
    if not args.train_file or not args.dev_file:
        raise ValueError(
            "--task pos needs --train FILE and --dev FILE (and optionally --test FILE)"
        )
    if len(args.mode) != 1 or len(args.k) != 1 or len(args.optimizer) != 1:
        raise ValueError("--task pos takes one --mode, one --k and one --optimizer")
    from .pos import run_pos_task

    result = run_pos_task(
        args.train_file,
        args.dev_file,
        args.test_file,
        mode=args.mode[0],
        k=args.k[0],
        hidden=args.hidden,
        embedding_dim=args.embedding_dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer[0],
        lr=args.lr,
        seeds=tuple(args.seeds),
        device=str(device),
        out=args.out,
        progress=not args.no_progress,
    )
    for name, model in result.get("models", {}).items():
        if isinstance(model, dict):
            numbers = ", ".join(
                f"{key} {value:.4g}" for key, value in model.items() if isinstance(value, float)
            )
            print(f"{name}: {numbers}")
    if "backward_speedup" in result:
        print(f"backward speedup over dense: {result['backward_speedup']:.2f}×")
    if args.out:
        print(f"results in {args.out}")
    return 0


def _run_window(args, device) -> int:
    import json
    import os

    from .window import WindowConfig, load_window_data, summarize_window, train_window

    if not args.train_file:
        raise ValueError(
            "--task window needs --train FILE (and optionally --dev FILE, --test FILE)"
        )
    if "sgd" in args.optimizer:
        raise ValueError("--task window trains with adam or adagrad")
    common = dict(
        hidden=args.hidden,
        layers=args.layers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    configs = []
    for optimizer in args.optimizer:
        name = "rowadam" if optimizer == "adam" and args.sparse_grad else optimizer
        if "dense" in args.mode:
            configs.append(WindowConfig(mode="dense", optimizer=optimizer, **common))
        for mode in (m for m in args.mode if m != "dense"):
            for k in args.k:
                configs.append(
                    WindowConfig(
                        mode=mode,
                        k=k,
                        optimizer=name,
                        simplify=args.simplify,
                        threshold=args.threshold,
                        prune_fraction=args.prune_fraction,
                        **common,
                    )
                )
    data, vocab, counts = load_window_data(args.train_file, args.test_file, args.dev_file)
    print(", ".join(f"{key} {value}" for key, value in counts.items()), flush=True)
    summaries = []
    for config in configs:
        runs = []
        for seed in args.seeds:

            def on_epoch(record, seed=seed):
                if not args.no_progress:
                    scores = ", ".join(
                        f"{key} {record[key]:.2f}"
                        for key in ("held_out_acc", "test_acc")
                        if key in record
                    )
                    print(
                        f"  {config.mode} {config.optimizer} seed {seed} epoch {record['epoch']}: "
                        f"loss {record['train_loss']:.4f}, {scores}",
                        flush=True,
                    )

            runs.append(train_window(config, data, vocab, seed, device, on_epoch))
        summary = summarize_window(runs)
        summaries.append(summary)
        test = (
            "n/a"
            if summary["test_acc"] is None
            else f"{summary['test_acc']:.2f} ± {summary['test_acc_std']:.2f}%"
        )
        k = "" if config.mode == "dense" else f" k={config.k_count}"
        print(
            f"{config.mode}{k} {config.optimizer}: test {test} at the best held-out epoch "
            f"(held-out {summary['held_out_acc']:.2f}%), hidden "
            f"{'/'.join(f'{w:.0f}' for w in summary['widths'])}",
            flush=True,
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "window_results.json")
        with open(path, "w") as f:
            json.dump(dict(data=counts, summaries=summaries), f, indent=1)
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # sweep and plot take their own options: hand everything after the command over unparsed.
    if argv and argv[0] in ("sweep", "plot"):
        import importlib

        module = importlib.import_module(f"triton_mebp.bench.{argv[0]}")
        try:
            return module.main(argv[1:]) or 0
        except USER_ERRORS as error:
            return user_error(argv[0], error)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        from .. import __version__

        print(__version__)
        return 0
    try:
        if args.out:
            check_out(args.out)
        if args.command == "demo":
            return run_demo(args)
        return run_train(args)
    except USER_ERRORS as error:
        return user_error(args.command, error)


if __name__ == "__main__":
    sys.exit(main())
