"""The LSTM tagger (triton_mebp.app.pos) on GUM by the same protocol as run.py: trains on the
GUM development file less every 10th sentence (held out to pick the epoch), reports the test
accuracy at the best held-out epoch. Appends one JSON line per run to lstm_runs.jsonl.

    nice -n 10 python docs/fidelity/lstm.py --epochs 8 --seeds 0
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from triton_mebp.app.pos import Tagger, Vocabulary, read_conllu, train_tagger  # noqa: E402
from triton_mebp.app.window import split_held_out  # noqa: E402

GUM = os.path.join(ROOT, "..", "shared", "data", "ud-gum")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--optimizers", nargs="+", default=["adam", "adagrad"])
    parser.add_argument("--modes", nargs="+", default=["dense", "unified", "per_example"])
    parser.add_argument("--k", type=int, default=100, help="gates kept of 4 x 500 (default 5%%)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, held_out = split_held_out(read_conllu(os.path.join(GUM, "en_gum-ud-dev.conllu")), 0.1)
    test = read_conllu(os.path.join(GUM, "en_gum-ud-test.conllu"))
    vocab = Vocabulary.from_sentences(train)
    data = [vocab.encode(s) for s in (train, held_out, test)]
    for seed in args.seeds:
        for optimizer in args.optimizers:
            for mode in args.modes:
                torch.manual_seed(seed)
                model = Tagger(len(vocab.words), len(vocab.tags), hidden=500, mode=mode, k=args.k)
                started = time.time()
                run = train_tagger(
                    model,
                    *data,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    optimizer=optimizer,
                    seed=seed,
                    progress=False,
                )
                run.update(
                    mode=mode,
                    k=args.k,
                    optimizer=optimizer,
                    epochs_run=args.epochs,
                    batch_size=args.batch_size,
                    wall_s=time.time() - started,
                )
                with open(os.path.join(HERE, "lstm_runs.jsonl"), "a") as f:
                    f.write(json.dumps(run) + "\n")
                print(
                    f"{mode} {optimizer} seed {seed}: test {run['test_accuracy']:.2f} at epoch "
                    f"{run['best_epoch']} ({run['wall_s']:.0f} s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
