"""The part-of-speech tagging task: CoNLL-U reading, vocabulary, tagger training with MeLSTM."""

import csv
import json
import random

import pytest
import torch

from triton_mebp.app.pos import UNSEEN_TAG, Tagger, Vocabulary, read_conllu, run_pos_task
from triton_mebp.rnn import MeLSTM

LEXICON = {
    "DET": ["the", "a", "this"],
    "NOUN": ["cat", "dog", "bird", "tree", "house"],
    "VERB": ["sees", "likes", "finds"],
    "ADJ": ["big", "red", "old"],
}


def _line(i, form, upos):
    return f"{i}\t{form}\t{form.lower()}\t{upos}\t_\t_\t0\t_\t_\t_"


def _sentence_lines(rng):
    """DET (ADJ) NOUN VERB DET NOUN, and "book" is a NOUN after DET, a VERB elsewhere."""
    words = [("DET", rng.choice(LEXICON["DET"]))]
    if rng.random() < 0.5:
        words.append(("ADJ", rng.choice(LEXICON["ADJ"])))
    words.append(("NOUN", rng.choice(LEXICON["NOUN"] + ["book"])))
    words.append(("VERB", rng.choice(LEXICON["VERB"] + ["book"])))
    words += [("DET", rng.choice(LEXICON["DET"])), ("NOUN", rng.choice(LEXICON["NOUN"]))]
    return [_line(i, w if w == "book" else w, tag) for i, (tag, w) in enumerate(words, 1)]


def write_corpus(path, n_sentences, seed, extras=True):
    rng = random.Random(seed)
    lines = []
    for s in range(n_sentences):
        lines.append(f"# sent_id = {s}")
        body = _sentence_lines(rng)
        if extras and s % 3 == 0:
            body.insert(1, "2-3\tdoesn't\t_\t_\t_\t_\t_\t_\t_\t_")  # multi-word token line
            body.append("6.1\tghost\tghost\tNOUN\t_\t_\t_\t_\t_\t_")  # empty node
        lines += body + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_conllu_skips_comments_multiword_tokens_and_empty_nodes(tmp_path):
    path = tmp_path / "a.conllu"
    path.write_text(
        "# text = The cats\n"
        "1\tThe\tthe\tDET\t_\t_\t2\tdet\t_\t_\n"
        "2-3\tcats'\t_\t_\t_\t_\t_\t_\t_\t_\n"
        "2\tcats\tcat\tNOUN\t_\t_\t0\troot\t_\t_\n"
        "3\t'\t'\tPART\t_\t_\t2\tcase\t_\t_\n"
        "3.1\tare\tbe\tAUX\t_\t_\t_\t_\t_\t_\n"
        "\n\n"
        "1\tRun\trun\tVERB\t_\t_\t0\troot\t_\t_",  # last sentence without a blank line
        encoding="utf-8",
    )
    assert read_conllu(path) == [
        (["The", "cats", "'"], ["DET", "NOUN", "PART"]),
        (["Run"], ["VERB"]),
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("2\tcats\tcat\tNOUN\t_\t_\t0", "expected 10 tab-separated fields, got 7"),
        ("x\tcats\tcat\tNOUN\t_\t_\t0\troot\t_\t_", "bad token id 'x'"),
        ("2-x\tcats\tcat\tNOUN\t_\t_\t0\troot\t_\t_", "bad token id '2-x'"),
        ("2\tcats\tcat\t_\t_\t_\t0\troot\t_\t_", "lacks a form or a UPOS tag"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.conllu"
    path.write_text("# c\n1\tThe\tthe\tDET\t_\t_\t2\tdet\t_\t_\n" + bad_line + "\n\n")
    with pytest.raises(ValueError, match=rf"bad\.conllu:3: .*{message}"):
        read_conllu(path)


def test_empty_file_is_reported(tmp_path):
    path = tmp_path / "empty.conllu"
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no sentences"):
        read_conllu(path)


def test_vocabulary_comes_from_training_sentences_only():
    train = [(["the", "cat", "the", "dog"], ["DET", "NOUN", "DET", "NOUN"])]
    vocab = Vocabulary.from_sentences(train, min_count=1)
    assert vocab.words[:2] == ["<pad>", "<unk>"] and set(vocab.words[2:]) == {"the", "cat", "dog"}
    assert vocab.tags == ["DET", "NOUN"]
    ((words, tags),) = vocab.encode([(["the", "zebra"], ["DET", "X"])])
    assert words == [vocab.word_index["the"], 1]
    assert tags == [0, UNSEEN_TAG]
    assert Vocabulary.from_sentences(train).words == ["<pad>", "<unk>", "the"]  # min_count 2


def test_tagger_uses_melstm_unless_dense():
    assert isinstance(Tagger(10, 3, embedding_dim=4, hidden=8, mode="per_example").lstm, MeLSTM)
    dense = Tagger(10, 3, embedding_dim=4, hidden=8, mode="dense").lstm
    assert type(dense) is torch.nn.LSTM
    with pytest.raises(ValueError, match="mode"):
        Tagger(10, 3, mode="sparse")


def test_run_pos_task_trains_and_compares_with_nn_lstm(tmp_path):
    train = write_corpus(tmp_path / "train.conllu", 48, seed=0)
    dev = write_corpus(tmp_path / "dev.conllu", 16, seed=1)
    test = write_corpus(tmp_path / "test.conllu", 16, seed=2, extras=False)
    result = run_pos_task(
        train,
        dev,
        test,
        mode="unified",
        k=0.25,
        hidden=16,
        embedding_dim=8,
        epochs=4,
        batch_size=8,
        optimizer="adam",
        lr=0.02,
        seeds=(0, 1),
        out=tmp_path / "out",
        progress=False,
    )
    assert result["data"]["tags"] == 4 and result["config"]["k_count"] == 16
    assert result["data"]["train_tokens"] == sum(
        1 for line in train.read_text().splitlines() if line and line.split("\t")[0].isdigit()
    )
    for name in ("mebp", "dense"):
        model = result["models"][name]
        assert [r["seed"] for r in model["runs"]] == [0, 1]
        assert model["dev_accuracy"] > 85 and model["test_accuracy"] > 85
        assert all(len(r["epochs"]) == 4 and r["backward_s_per_epoch"] > 0 for r in model["runs"])
        first, last = model["runs"][0]["epochs"][0], model["runs"][0]["epochs"][-1]
        assert last["train_loss"] < first["train_loss"]
        for run in model["runs"]:  # test accuracy at the first epoch with the best dev accuracy
            dev = [e["dev_accuracy"] for e in run["epochs"]]
            best = run["epochs"][dev.index(max(dev))]
            assert (run["best_epoch"], run["dev_accuracy"], run["test_accuracy"]) == (
                best["epoch"],
                best["dev_accuracy"],
                best["test_accuracy"],
            )
            assert run["last_test_accuracy"] == run["epochs"][-1]["test_accuracy"]
    assert "MeLSTM" in result["models"]["mebp"]["lstm"]
    assert result["models"]["dense"]["lstm"].startswith("LSTM(")
    assert result["backward_speedup"] == pytest.approx(
        result["models"]["dense"]["backward_s_per_epoch"]
        / result["models"]["mebp"]["backward_s_per_epoch"]
    )
    saved = json.loads((tmp_path / "out" / "pos_results.json").read_text())
    assert saved["models"]["mebp"]["dev_accuracy"] == result["models"]["mebp"]["dev_accuracy"]
    with open(tmp_path / "out" / "pos_epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 4 and {r["model"] for r in rows} == {"mebp", "dense"}


def test_dense_mode_trains_the_baseline_alone(tmp_path):
    train = write_corpus(tmp_path / "train.conllu", 8, seed=0)
    dev = write_corpus(tmp_path / "dev.conllu", 4, seed=1)
    result = run_pos_task(
        train,
        dev,
        mode="dense",
        hidden=8,
        embedding_dim=4,
        epochs=1,
        batch_size=4,
        optimizer="sgd",
        progress=False,
    )
    assert list(result["models"]) == ["dense"] and result["backward_speedup"] is None
    assert result["models"]["dense"]["test_accuracy"] is None
    assert result["config"]["lr"] == 0.1


def test_bad_arguments_are_reported(tmp_path):
    train = write_corpus(tmp_path / "train.conllu", 4, seed=0)
    with pytest.raises(FileNotFoundError, match="dev file"):
        run_pos_task(train, tmp_path / "missing.conllu", progress=False)
    with pytest.raises(ValueError, match="mode"):
        run_pos_task(train, train, mode="sparse", progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        run_pos_task(train, train, optimizer="lbfgs", progress=False)
    with pytest.raises(ValueError, match="epochs"):
        run_pos_task(train, train, epochs=0, progress=False)
    with pytest.raises(ValueError, match="outside"):
        run_pos_task(train, train, hidden=8, k=33, progress=False)
