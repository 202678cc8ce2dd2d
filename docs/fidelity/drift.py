"""How the hidden activations of the window tagger evolve in its first 200 steps (batch 100,
Adam lr 1e-3 unless named, k = 25 of 500 in both hidden layers unless named, ReLU unless named,
seed 0): writes drift.csv next to this file. ``h1``/``h2`` are the hidden layers' outputs.

    nice -n 10 python docs/fidelity/drift.py
"""

import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from triton_mebp.app.train import make_optimizer  # noqa: E402
from triton_mebp.app.window import WindowTagger, load_window_data  # noqa: E402
from triton_mebp.modules import MeLinear, convert  # noqa: E402

SETTINGS = {  # name: (mode, optimizer, lr, eps, step_scale, meProp layers, activation)
    "dense, adam": ("dense", "adam", 1e-3, None, False, (), "relu"),
    "unified, adam": ("unified", "adam", 1e-3, None, False, ("0", "2"), "relu"),
    "per-example, adam": ("per_example", "adam", 1e-3, None, False, ("0", "2"), "relu"),
    "per-example, adam eps=1e-3": ("per_example", "adam", 1e-3, 1e-3, False, ("0", "2"), "relu"),
    "per-example, adam, step scaled": ("per_example", "adam", 1e-3, None, True, ("0", "2"), "relu"),
    "per-example, adagrad lr=0.05": (
        "per_example",
        "adagrad",
        0.05,
        None,
        False,
        ("0", "2"),
        "relu",
    ),
    "per-example in layer 1 only, adam": ("per_example", "adam", 1e-3, None, False, ("0",), "relu"),
    "per-example in layer 2 only, adam": ("per_example", "adam", 1e-3, None, False, ("2",), "relu"),
    "dense, adam, tanh": ("dense", "adam", 1e-3, None, False, (), "tanh"),
    "per-example, adam, tanh": ("per_example", "adam", 1e-3, None, False, ("0", "2"), "tanh"),
}
STEPS, EVERY, BATCH = 200, 25, 100


def trace(name, mode, optimizer_name, lr, eps, step_scale, me_layers, activation, data, vocab):
    features, tags = data["train"]
    torch.manual_seed(0)
    model = WindowTagger(vocab.sizes(), len(vocab.tags), activation=activation)
    if mode != "dense":
        model.mlp = convert(
            model.mlp,
            k=25,
            mode=mode,
            count_hits=True,
            inplace=True,
            exclude=[n for n in ("0", "2") if n not in me_layers],
        )
    layers = [m for m in model.mlp if isinstance(m, MeLinear)]
    optimizer = make_optimizer(optimizer_name, model.parameters(), lr, False, eps)
    outputs = {}
    for i, module in enumerate(model.mlp):
        module.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out.detach()))
    order = torch.randperm(len(tags), generator=torch.Generator().manual_seed(0))
    rows = []
    for step in range(1, STEPS + 1):
        batch = order[(step - 1) * BATCH : step * BATCH]
        for layer in layers:
            layer.reset_hits()
        loss = F.cross_entropy(model(features[batch]), tags[batch])
        optimizer.zero_grad()
        loss.backward()
        before = [layer.weight.detach().clone() for layer in layers] if step_scale else []
        optimizer.step()
        with torch.no_grad():
            for layer, old in zip(layers, before):
                layer.weight.copy_(
                    torch.lerp(old, layer.weight, (layer.hits.float() / len(batch)).unsqueeze(1))
                )
        if step % EVERY == 0:
            rows.append(
                dict(
                    setting=name,
                    step=step,
                    loss=loss.item(),
                    h1_mean=outputs[1].mean().item(),
                    h1_active=(outputs[1] > 0).float().mean().item(),
                    h2_mean=outputs[3].mean().item(),
                    h2_active=(outputs[3] > 0).float().mean().item(),
                    logit_absmax=outputs[4].abs().max().item(),
                    w1_norm=model.mlp[0].weight.norm().item(),
                    w2_norm=model.mlp[2].weight.norm().item(),
                )
            )
            print(rows[-1], flush=True)
    return rows


def main():
    torch.set_num_threads(1)
    gum = os.path.join(ROOT, "..", "shared", "data", "ud-gum")
    data, vocab, _ = load_window_data(os.path.join(gum, "en_gum-ud-dev.conllu"))
    rows = []
    for name, setting in SETTINGS.items():
        rows += trace(name, *setting, data, vocab)
    with open(os.path.join(HERE, "drift.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
