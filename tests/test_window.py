"""The window MLP tagger: features, held-out split, best-epoch selection, row scaling, CLI."""

import json

import pytest
import torch

import triton_mebp as mebp
from test_pos import write_corpus
from triton_mebp.app import cli
from triton_mebp.app.window import (
    WindowConfig,
    WindowTagger,
    WindowVocabulary,
    _divide_rows,
    load_window_data,
    split_held_out,
    train_window,
    word_shape,
)


@pytest.mark.parametrize(
    "form, shape",
    [
        ("Obama", "Xx"),
        ("1990s", "dx"),
        ("e-mail", "x-x"),
        ("U.S.", "X.X."),
        ("the", "x"),
        ("(", "("),
    ],
)
def test_word_shape(form, shape):
    assert word_shape(form) == shape


def test_features_are_the_window_around_each_token():
    sentences = [
        (["The", "cat", "sat"], ["DET", "NOUN", "VERB"]),
        (["The", "cat"], ["DET", "NOUN"]),
    ]
    vocab = WindowVocabulary.from_sentences(sentences, min_count=2)
    features, tags = vocab.encode(sentences + [(["A", "cat"], ["DET", "NOUN"])])
    the, cat = vocab.index["word"]["the"], vocab.index["word"]["cat"]
    # "sat" is seen once: unknown (1); sentence boundaries are 0
    assert features[:3, :5].tolist() == [
        [0, 0, the, cat, 1],
        [0, the, cat, 1, 0],
        [the, cat, 1, 0, 0],
    ]
    xx, x = vocab.index["shape"]["Xx"], vocab.index["shape"]["x"]
    assert features[0, 10:].tolist() == [0, 0, xx, x, x]
    assert features[5, :5].tolist() == [0, 0, 1, cat, 0]  # "a" is unknown
    assert tags.tolist() == [
        vocab.tag_index[t] for t in ["DET", "NOUN", "VERB", "DET", "NOUN", "DET", "NOUN"]
    ]


def test_held_out_split_is_a_spread_out_partition():
    sentences = [([str(i)], ["X"]) for i in range(25)]
    train, held = split_held_out(sentences, 0.1)
    assert [s[0][0] for s in held] == ["9", "19"]
    assert sorted(train + held) == sorted(sentences)


def test_rows_are_divided_by_their_counts():
    weight = torch.nn.Parameter(torch.zeros(4, 3))
    counts = torch.tensor([2, 0, 1, 4])
    grad = torch.arange(12.0).view(4, 3)
    weight.grad = grad.clone()
    _divide_rows(weight, counts)
    assert torch.equal(weight.grad, grad / torch.tensor([2.0, 1.0, 1.0, 4.0]).unsqueeze(1))
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[3, 0]]), grad[[3, 0]], (4, 3))
    _divide_rows(weight, counts)
    expected = torch.zeros(4, 3)
    expected[0], expected[3] = grad[0] / 2, grad[3] / 4
    assert torch.equal(weight.grad.to_dense(), expected)


def test_per_example_counts_are_examples_that_selected_each_row():
    layer = mebp.MeLinear(5, 8, k=2, mode="per_example", count_hits=True)
    x = torch.randn(6, 5)
    dy = torch.randn(6, 8)
    layer(x).backward(dy)
    chosen = dy.abs().topk(2, dim=1).indices
    expected = torch.zeros(8, dtype=torch.int64).index_add_(
        0, chosen.flatten(), torch.ones(12, dtype=torch.int64)
    )
    assert torch.equal(layer.hits, expected)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("window")
    return (
        write_corpus(folder / "train.conllu", 120, seed=1),
        write_corpus(folder / "test.conllu", 40, seed=2),
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(mode="dense"),
        dict(mode="per_example", k=4, row_scale=True),
        dict(mode="per_example", k=4, step_scale=True, activation="tanh"),
        dict(mode="unified", k=4, optimizer="rowadam", clip=5.0),
        dict(mode="unified", k=4, optimizer="adagrad", simplify=True),
    ],
)
def test_tagger_learns_and_reports_the_best_held_out_epoch(corpus, options):
    data, vocab, counts = load_window_data(*corpus)
    assert counts["held_out_sentences"] == 12 and counts["test_sentences"] == 40
    config = WindowConfig(hidden=16, epochs=4, batch_size=8, lr=options.pop("lr", None), **options)
    torch.set_num_threads(1)
    result = train_window(config, data, vocab, seed=0)
    records = result["epochs"]
    first = 2 if config.simplify else 0  # meSimp prunes after epochs 1 and 2
    best = max(records[first:], key=lambda r: r["held_out_acc"])
    best = next(r for r in records[first:] if r["held_out_acc"] == best["held_out_acc"])
    assert result["best_epoch"] == best["epoch"] and result["test_acc"] == best["test_acc"]
    assert result["test_acc"] > 80.0, records  # the grammar is easy; chance is about 25%
    if config.simplify:
        assert max(result["widths"]) < 16


def test_bad_window_settings():
    with pytest.raises(ValueError, match="optimizer"):
        WindowConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="meProp mode"):
        WindowConfig(mode="dense", row_scale=True)
    with pytest.raises(ValueError, match="k="):
        WindowConfig(k=501)
    with pytest.raises(ValueError, match="activation"):
        WindowTagger([4, 4, 4], 3, activation="gelu")


def test_cli_window_task(corpus, tmp_path, capsys):
    train, test = corpus
    rc = cli.main(
        [
            "train",
            "--task",
            "window",
            "--train",
            str(train),
            "--test",
            str(test),
            "--mode",
            "dense",
            "unified",
            "--k",
            "4",
            "--hidden",
            "16",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--optimizer",
            "adam",
            "--sparse-grad",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "unified k=4 rowadam: test" in printed and "dense adam: test" in printed
    payload = json.loads((tmp_path / "window_results.json").read_text())
    assert [s["config"]["optimizer"] for s in payload["summaries"]] == ["adam", "rowadam"]
    assert cli.main(["train", "--task", "window"]) == 2
