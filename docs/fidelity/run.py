"""The papers' protocol on UD English-GUM with the window MLP tagger (docs/fidelity.md).

Trains on the GUM development file (a held-out tenth of its sentences picks the epoch), tests on
the GUM test file, and appends one JSON line per (setting, seed) to runs.jsonl next to this file.
Resumable: settings already in runs.jsonl are skipped. Jobs run in priority order (every
setting's seed 0 first), in ``--workers`` processes of one PyTorch thread each; no job starts
after ``--until`` (UTC, HH:MM).

    nice -n 10 python docs/fidelity/run.py --set grid --workers 2 --until 09:45
"""

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from triton_mebp.app.window import WindowConfig, load_window_data, train_window  # noqa: E402

GUM = os.path.join(ROOT, "..", "shared", "data", "ud-gum")
TRAIN = os.path.join(GUM, "en_gum-ud-dev.conllu")
TEST = os.path.join(GUM, "en_gum-ud-test.conllu")
RESULTS = os.path.join(HERE, "runs.jsonl")
COMMON = dict(epochs=6, batch_size=100, hidden=500, layers=2)
SEEDS = (0, 1, 2)


def grid_configs():
    configs = [WindowConfig(mode="dense", optimizer=o, **COMMON) for o in ("adam", "adagrad")]
    for k in (0.05, 0.16):
        for mode in ("unified", "per_example"):
            for optimizer in ("adam", "rowadam", "adagrad"):
                configs.append(WindowConfig(mode=mode, k=k, optimizer=optimizer, **COMMON))
    return configs


def k_more_configs():
    """k = 2% and 10%, every mode and optimizer."""
    return [
        WindowConfig(mode=mode, k=k, optimizer=optimizer, **COMMON)
        for k in (0.02, 0.10)
        for mode in ("unified", "per_example")
        for optimizer in ("adam", "rowadam", "adagrad")
    ]


def leads_configs():
    """Per-example + Adam at k = 5%: the leads of issue 15, item 2."""
    return [
        WindowConfig(mode="per_example", k=0.05, optimizer=o, row_scale=True, **COMMON)
        for o in ("adam", "rowadam")
    ] + [WindowConfig(mode="per_example", k=0.05, optimizer="adam", clip=5.0, **COMMON)]


def step_scale_configs():
    return [
        WindowConfig(mode="per_example", k=0.05, optimizer=o, step_scale=True, **COMMON)
        for o in ("adam", "rowadam")
    ]


def tanh_configs():
    """Zero-centred hidden activations: per-example + Adam against its dense and unified rows."""
    return [
        WindowConfig(mode=m, k=0.05, optimizer="adam", activation="tanh", **COMMON)
        for m in ("dense", "per_example", "unified")
    ]


def tanh_rowadam_configs():
    return [
        WindowConfig(mode=m, k=0.05, optimizer="rowadam", activation="tanh", **COMMON)
        for m in ("per_example", "unified")
    ]


def core_configs():
    """The rows that get seeds 1 and 2 first when time is short."""
    by_key = lambda mode, k, o: WindowConfig(mode=mode, k=k, optimizer=o, **COMMON)
    return [
        by_key("dense", 0.05, "adam"),
        by_key("dense", 0.05, "adagrad"),
        by_key("unified", 0.05, "adam"),
        by_key("unified", 0.05, "adagrad"),
        by_key("per_example", 0.05, "adagrad"),
        step_scale_configs()[0],
    ]


def mesimp_configs(spec):
    mode, k, optimizer = spec.split(":")
    return [WindowConfig(mode=mode, k=float(k), optimizer=optimizer, simplify=True, **COMMON)]


def key(config, seed):
    return json.dumps([dataclasses.asdict(config), seed], sort_keys=True)


def done_keys():
    if not os.path.exists(RESULTS):
        return set()
    with open(RESULTS) as f:
        return {key(WindowConfig(**r["config"]), r["seed"]) for r in map(json.loads, f)}


_DATA = None


def _run(job):
    config, seed, until = job
    if datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M") >= until:
        return None
    torch.set_num_threads(1)
    data, vocab, counts = _DATA
    started = time.time()
    result = train_window(config, data, vocab, seed)
    result.update(
        data=counts,
        wall_s=time.time() - started,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return result


def main():
    global _DATA
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--set",
        action="append",
        required=True,
        help="grid, leads, step_scale, core, tanh, tanh_rowadam, k_more or mesimp:MODE:K:OPTIMIZER (repeatable; "
        "jobs run in the order given, all seeds of one set before the next)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--until", default="23:59", help="no job starts after this UTC time")
    args = parser.parse_args()
    done = done_keys()
    jobs, seen = [], set(done)
    for name in args.set:  # each set in turn, seed-major within it
        group = (
            {
                "grid": grid_configs,
                "leads": leads_configs,
                "step_scale": step_scale_configs,
                "core": core_configs,
                "tanh": tanh_configs,
                "tanh_rowadam": tanh_rowadam_configs,
                "k_more": k_more_configs,
            }[name]()
            if ":" not in name
            else mesimp_configs(name.split(":", 1)[1])
        )
        for seed in args.seeds:
            for config in group:
                if key(config, seed) not in seen:
                    seen.add(key(config, seed))
                    jobs.append((config, seed, args.until))
    print(f"{len(jobs)} jobs to run, {len(done)} done", flush=True)
    _DATA = load_window_data(TRAIN, TEST)
    torch.set_num_threads(1)
    with multiprocessing.get_context("fork").Pool(args.workers, maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(_run, jobs):
            if result is None:
                continue
            with open(RESULTS, "a") as f:
                f.write(json.dumps(result) + "\n")
            c = result["config"]
            print(
                f"{c['mode']} k={c['k']} {c['optimizer']} seed {result['seed']}: test "
                f"{result['test_acc']:.2f} at epoch {result['best_epoch']} "
                f"({result['wall_s']:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
