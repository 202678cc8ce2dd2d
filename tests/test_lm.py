"""The character-level language-model task (``mebp train --task lm``) at a tiny size."""

import csv
import math

import pytest
import torch

from triton_mebp.app import cli
from triton_mebp.app.lm import (
    CharTransformer,
    LMConfig,
    corpus_from_text,
    load_pydoc_topics,
    run_lm_experiment,
    train_lm,
    validation_loss,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread, so that a busy machine does not stall them in thread sync."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(
    width=16,
    layers=2,
    heads=2,
    context=8,
    batch_size=4,
    steps=6,
    eval_every=3,
    eval_tokens=64,
    lr=1e-2,
)
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def test_pydoc_corpus_has_a_fixed_split():
    from pydoc_data.topics import topics

    corpus = load_pydoc_topics()
    text = "\n\n".join(topics[name] for name in sorted(topics))
    assert len(corpus.train) + len(corpus.validation) == len(text)
    assert len(corpus.train) == round(0.9 * len(text))
    decoded = "".join(corpus.chars[i] for i in corpus.validation[:200].tolist())
    assert decoded == text[len(corpus.train) : len(corpus.train) + 200]
    with pytest.raises(ValueError, match="too short"):
        corpus_from_text("ab")


def test_validation_loss_is_mean_cross_entropy_of_the_windows():
    corpus = corpus_from_text(TEXT)
    model = CharTransformer(corpus.vocab_size, 16, 1, 2, 8)
    ids = corpus.validation
    expected = []
    with torch.no_grad():
        for start in range(0, 4 * 8, 8):
            window = ids[start : start + 9]
            logits = model(window[:-1].unsqueeze(0))[0]
            expected.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction="none"))
    expected = torch.cat(expected).mean().item()
    assert math.isclose(validation_loss(model, ids, 8, 32, "cpu", batch=3), expected, rel_tol=1e-5)


@pytest.mark.parametrize("arch", ["gpt", "torch"])
def test_lm_trains_dense_meprop_and_mesimp(arch):
    corpus = corpus_from_text(TEXT)
    second = "*.mlp.2" if arch == "gpt" else "*.linear2"
    configs = [
        LMConfig(mode="dense", arch=arch, **TINY),
        LMConfig(mode="unified", k=0.25, arch=arch, exclude=(second,), **TINY),
        LMConfig(mode="unified", k=0.25, attention_k=1.0, sparse_grad=True, arch=arch, **TINY),
        LMConfig(
            mode="unified",
            k=0.25,
            sparse_grad=True,
            simplify=True,
            threshold=0.5,
            prune_every=2,
            arch=arch,
            **TINY,
        ),
    ]
    summaries = run_lm_experiment(configs, corpus, seeds=[0], progress=False)
    dense, mebp, mlp_only, mesimp = summaries
    for s in summaries:
        run = s["runs"][0]
        assert math.isfinite(s["val_loss_mean"]) and s["backward_s_mean"] > 0
        assert s["val_bpc_mean"] == pytest.approx(s["val_loss_mean"] / math.log(2))
        assert [e["step"] for e in run["evals"]] == [3, 6]
    # Training moves the validation loss away from its starting value (uniform: log vocab).
    assert dense["val_loss_mean"] < math.log(corpus.vocab_size)
    assert dense["converted"] == {} and dense["bpc_gap"] == 0.0
    attention = "attn.qkv" if arch == "gpt" else "self_attn.in_proj"
    mlp = "mlp.0" if arch == "gpt" else "linear1"
    assert any(name.endswith(attention) for name in mebp["converted"])
    assert any(name.endswith(mlp) for name in mebp["converted"])
    assert "lm_head" in mebp["dense"]
    assert (
        "excluded by the pattern"
        in mebp["dense"]["blocks.1.mlp.2" if arch == "gpt" else "blocks.layers.1.linear2"]
    )
    qkv = next(k for name, k in mlp_only["converted"].items() if name.endswith(attention))
    assert qkv == 48  # attention_k=1.0: every output kept
    assert mesimp["initial_widths"] == [64, 64]
    assert all(w < 64 for w in mesimp["widths_mean"]) and mesimp["runs"][0]["prunes"]
    assert mesimp["params_mean"] < dense["params_mean"]


def test_lm_config_errors():
    with pytest.raises(ValueError, match="meProp mode"):
        LMConfig(mode="dense", simplify=True)
    with pytest.raises(ValueError, match="meProp mode"):
        LMConfig(mode="dense", exclude=("*.mlp.2",))
    with pytest.raises(ValueError, match="adamw"):
        LMConfig(optimizer="adam")
    with pytest.raises(ValueError, match="multiple of heads"):
        LMConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="k=200"):
        LMConfig(mode="unified", k=200, width=128)
    with pytest.raises(ValueError, match="validation text .9 characters. is shorter"):
        train_lm(LMConfig(context=64), corpus_from_text("abc" * 30))
    with pytest.raises(ValueError, match="training text .54 characters. is shorter"):
        train_lm(LMConfig(context=64), corpus_from_text("abc" * 30, validation_fraction=0.4))


def test_cli_lm_end_to_end(tmp_path, capsys):
    out = tmp_path / "lm"
    argv = [
        "train",
        "--task",
        "lm",
        "--mode",
        "dense",
        "unified",
        "--k",
        "25%",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--eval-tokens",
        "64",
        "--width",
        "16",
        "--heads",
        "2",
        "--context",
        "8",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "val bits/char" in printed and "meProp unified k=25%, AdamW" in printed
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["dense", "unified"]
    for name in (
        "results.json",
        "table.md",
        "bpc_vs_k.png",
        "validation_curves.png",
        "step_times.png",
    ):
        assert (out / name).stat().st_size > 0
    assert cli.main(["train", "--task", "lm", "--optimizer", "adagrad", "--out", ""]) == 2
    assert "adamw" in capsys.readouterr().err
