"""Transformers: MeMultiheadAttention, convert() on attention and MLP projections with per-role
options and its report, meProp gradients against a float64 masked-dense reference, meSimp of
the blocks' MLP width."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_mebp as mebp
from reference import selection_mask
from triton_mebp.simplify import Simplifier, load_simplified, save_simplified

F64 = dict(atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# An independent reference: masked-dense meProp in float64 with torch ops


class MaskedDenseLinear(torch.autograd.Function):
    """y = x W^T + b; backward: dense products on dy with all but the top-k entries zeroed."""

    @staticmethod
    def forward(ctx, x, weight, bias, k, mode):
        ctx.save_for_backward(x, weight)
        ctx.k, ctx.mode = k, mode
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.shape[0])
        kept = torch.where(selection_mask(dy2, ctx.k, ctx.mode), dy2, torch.zeros_like(dy2))
        dx = (kept @ weight).reshape(x.shape)
        return dx, kept.t() @ x.reshape(-1, weight.shape[1]), dy2.sum(0), None, None


def masked_linear(x, weight, bias, k, mode):
    if k is None:
        return F.linear(x, weight, bias)
    return MaskedDenseLinear.apply(x, weight, bias, k, mode)


class ReferenceLinear(nn.Module):
    def __init__(self, linear, k, mode):
        super().__init__()
        self.weight, self.bias, self.k, self.mode = linear.weight, linear.bias, k, mode

    def forward(self, x):
        return masked_linear(x, self.weight, self.bias, self.k, self.mode)


def reference_encoder_layer(layer, x, ks, mode):
    """nn.TransformerEncoderLayer's forward (post-norm, ReLU, no dropout, batch first) written
    out by hand, each projection a masked-dense linear with its own k."""
    attn = layer.self_attn
    B, T, E = x.shape
    H = attn.num_heads
    qkv = masked_linear(x, attn.in_proj_weight, attn.in_proj_bias, ks["in_proj"], mode)
    q, k, v = (t.reshape(B, T, H, E // H).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E // H), dim=-1)
    heads = (weights @ v).transpose(1, 2).reshape(B, T, E)
    out = masked_linear(heads, attn.out_proj.weight, attn.out_proj.bias, ks["out_proj"], mode)
    x = layer.norm1(x + out)
    hidden = torch.relu(
        masked_linear(x, layer.linear1.weight, layer.linear1.bias, ks["linear1"], mode)
    )
    y = masked_linear(hidden, layer.linear2.weight, layer.linear2.bias, ks["linear2"], mode)
    return layer.norm2(x + y)


class CausalSelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # unpacked at once, so that torch.fx traces it
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(2))


class GPTBlock(nn.Module):
    """A hand-written pre-norm GPT block built from nn.Linear."""

    def __init__(self, width=16, heads=2, hidden=40):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=11, width=16, blocks=2, hidden=40):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(GPTBlock(width, 2, hidden) for _ in range(blocks))
        self.ln = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln(x))


def grads(model):
    return {name: p.grad.to_dense() for name, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# MeMultiheadAttention: forward equals nn.MultiheadAttention's in every configuration


MHA_CONFIGS = [
    dict(),
    dict(bias=False),
    dict(kdim=6, vdim=5),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
]


@pytest.mark.parametrize("config", MHA_CONFIGS, ids=lambda c: ",".join(c) or "plain")
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_forward_equals_torch(config, batch_first):
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **config).double()
    me = mebp.MeMultiheadAttention.from_mha(mha, in_proj_k=0.25)
    assert me.in_proj_weight is mha.in_proj_weight and me.out_proj is mha.out_proj
    L, S, B = 5, 7, 3
    shape = lambda n, e: (B, n, e) if batch_first else (n, B, e)
    q = torch.randn(shape(L, 8), dtype=torch.float64)
    k = torch.randn(shape(S, config.get("kdim", 8)), dtype=torch.float64)
    v = torch.randn(shape(S, config.get("vdim", 8)), dtype=torch.float64)
    padding = torch.rand(B, S) < 0.3
    padding[:, 0] = False
    calls = [
        ((q, k, v), dict()),
        ((q, k, v), dict(need_weights=False)),
        ((q, k, v), dict(key_padding_mask=padding, attn_mask=torch.rand(L, S) < 0.2)),
        (
            (q, k, v),
            dict(
                average_attn_weights=False, attn_mask=torch.randn(B * 2, L, S, dtype=torch.float64)
            ),
        ),
    ]
    if "kdim" not in config:
        causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
        calls += [
            ((q, q, q), dict()),
            ((q, k, k), dict(need_weights=False)),
            ((q, q, q), dict(attn_mask=causal, is_causal=True, need_weights=False)),
            ((q[0] if batch_first else q[:, 0],) * 3, dict()),
        ]  # unbatched
    for args, kwargs in calls:
        expected, expected_weights = mha(*args, **kwargs)
        actual, weights = me(*args, **kwargs)
        torch.testing.assert_close(actual, expected, **F64)
        if expected_weights is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, expected_weights, **F64)


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_mha_cross_attention_gradients_match_reference(mode):
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    me = mebp.MeMultiheadAttention.from_mha(copy.deepcopy(mha), in_proj_k=6, mode=mode)
    query = torch.randn(3, 4, 8, dtype=torch.float64)
    memory = torch.randn(3, 5, 8, dtype=torch.float64)
    dy = torch.randn(3, 4, 8, dtype=torch.float64)
    me(query, memory, memory, need_weights=False)[0].backward(dy)
    # Reference: the query slice keeps 2 of 8 outputs, the key/value slice 4 of 16 (6 of 24).
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = masked_linear(query, w[:8], b[:8], 2, mode)
    k, v = masked_linear(memory, w[8:], b[8:], 4, mode).chunk(2, dim=-1)
    split = lambda t: t.unflatten(-1, (2, 4)).transpose(1, 2)
    heads = torch.softmax(split(q) @ split(k).transpose(-2, -1) / 2.0, dim=-1) @ split(v)
    mha.out_proj(heads.transpose(1, 2).flatten(2)).backward(dy)
    torch.testing.assert_close(me.in_proj_weight.grad, mha.in_proj_weight.grad, **F64)
    torch.testing.assert_close(me.in_proj_bias.grad, mha.in_proj_bias.grad, **F64)


def test_mha_built_directly_and_deep_copied():
    me = mebp.MeMultiheadAttention(8, 2, batch_first=True, in_proj_k=4, grad="sparse")
    copied = copy.deepcopy(me)
    assert copied.in_proj_k == 4 and copied.in_proj_weight is not me.in_proj_weight
    plain = nn.MultiheadAttention(8, 2, batch_first=True)
    plain.load_state_dict(me.state_dict())
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(copied(x, x, x)[0], plain(x, x, x)[0])
    copied(x, x, x)[0].sum().backward()
    assert copied.in_proj_weight.grad.is_sparse
    assert copied.in_proj_weight.grad.coalesce().indices().shape[1] == 4


def test_mha_bad_k_names_the_in_projection():
    with pytest.raises(ValueError, match="in-projection.*24"):
        mebp.MeMultiheadAttention.from_mha(nn.MultiheadAttention(8, 2), in_proj_k=25)
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        mebp.MeMultiheadAttention.from_mha(nn.Linear(3, 3))


# ---------------------------------------------------------------------------------------------
# Gradients of converted transformers against the float64 masked-dense reference


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_encoder_layer_gradients_match_masked_dense_reference(mode):
    layer = nn.TransformerEncoderLayer(16, 2, 40, dropout=0.0, batch_first=True).double()
    reference = copy.deepcopy(layer)
    converted, report = mebp.convert(
        layer, k=0.25, attention_k=0.5, mode=mode, skip_output=False, report=True
    )
    ks = {"in_proj": 24, "out_proj": 8, "linear1": 10, "linear2": 4}
    assert report.converted == {f"self_attn.{n}" if "proj" in n else n: k for n, k in ks.items()}
    assert isinstance(converted.self_attn, mebp.MeMultiheadAttention)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    dy = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(converted(x), layer(x), **F64)
    converted(x).backward(dy)
    reference_encoder_layer(reference, x, ks, mode).backward(dy)
    expected, actual = grads(reference), grads(converted)
    assert set(actual) == set(expected) == {n for n, _ in layer.named_parameters()}
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **F64, msg=name)
    # The reference is not trivially equal to dense back propagation.
    dense = copy.deepcopy(reference)
    dense(x).backward(dy)
    assert not torch.allclose(dense.linear1.weight.grad, expected["linear1.weight"])


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_gpt_block_gradients_match_masked_dense_reference(mode):
    block = GPTBlock().double()
    reference = copy.deepcopy(block)
    converted, report = mebp.convert(
        block, k=0.25, attention_k=5, mlp_k=0.1, mode=mode, skip_output=False, report=True
    )
    ks = {"attn.qkv": 5, "attn.proj": 5, "mlp.0": 4, "mlp.2": 2}
    assert report.converted == ks
    for name, k in ks.items():
        owner, _, child = name.rpartition(".")
        parent = reference.get_submodule(owner)
        setattr(parent, child, ReferenceLinear(getattr(parent, child), k, mode))
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    dy = torch.randn(3, 6, 16, dtype=torch.float64)
    converted(x).backward(dy)
    reference(x).backward(dy)
    expected, actual = grads(reference), grads(converted)
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **F64, msg=name)


def test_sparse_gradients_for_the_packed_in_projection():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    converted = mebp.convert(layer, k=0.25, grad="sparse", skip_output=False)
    optimizer = mebp.RowAdamW(converted.parameters(), lr=1e-2)
    before = converted.self_attn.in_proj_weight.detach().clone()
    converted(torch.randn(2, 5, 16)).pow(2).sum().backward()
    grad = converted.self_attn.in_proj_weight.grad
    assert grad.is_sparse and grad.coalesce().indices().shape[1] == 12
    optimizer.step()
    moved = (converted.self_attn.in_proj_weight.detach() != before).any(1).nonzero().flatten()
    assert torch.equal(moved, grad.coalesce().indices()[0])


# ---------------------------------------------------------------------------------------------
# convert's report, roles and exclusions


def test_convert_report_says_what_was_left_dense_and_why():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 16)
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                2,
                enable_nested_tensor=False,
            )
            self.cross = nn.MultiheadAttention(16, 2, batch_first=True)
            self.lm_head = nn.Linear(16, 10)

        def forward(self, tokens):
            x = self.encoder(self.embed(tokens))
            return self.lm_head(self.cross(x, x, x, need_weights=False)[0])

    model = Model()
    converted, report = mebp.convert(
        model, k=0.25, exclude=("cross", "*.1.self_attn.in_proj"), report=True
    )
    assert isinstance(report, mebp.ConvertReport)
    assert report.converted == {
        "encoder.layers.0.self_attn.in_proj": 12,
        "encoder.layers.0.self_attn.out_proj": 4,
        "encoder.layers.0.linear1": 8,
        "encoder.layers.0.linear2": 4,
        "encoder.layers.1.self_attn.out_proj": 4,
        "encoder.layers.1.linear1": 8,
        "encoder.layers.1.linear2": 4,
    }
    dense = report.dense
    assert (
        dense["encoder.layers.1.self_attn.in_proj"]
        == "excluded by the pattern '*.1.self_attn.in_proj'"
    )
    assert dense["cross.in_proj"] == dense["cross.out_proj"] == "excluded by the pattern 'cross'"
    assert "output layer" in dense["lm_head"] and "Embedding" in dense["embed"]
    assert "LayerNorm" in dense["encoder.layers.0.norm1"]
    assert type(converted.cross) is nn.MultiheadAttention
    assert converted.encoder.layers[1].self_attn.in_proj_k is None
    assert "encoder.layers.0.self_attn.in_proj" in str(report)
    tokens = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(converted(tokens), model(tokens))
    converted(tokens).sum().backward()
    assert converted.encoder.layers[0].self_attn.in_proj_weight.grad.ne(0).any(1).sum() == 12
    assert converted.encoder.layers[1].self_attn.in_proj_weight.grad.ne(0).any(1).sum() == 48


def test_output_layer_is_never_inside_a_transformer_layer():
    stack = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False
    )
    _, report = mebp.convert(stack, k=0.25, report=True)
    assert report.converted["layers.1.linear2"] == 4 and report.dense.keys() == {
        f"layers.{i}.norm{j}" for i in (0, 1) for j in (1, 2)
    }
    _, report = mebp.convert(stack.layers[0], k=0.25, report=True)
    assert report.converted["linear2"] == 4
    _, report = mebp.convert(
        nn.Sequential(stack, nn.Linear(16, 3)), k=0.25, exclude="1", report=True
    )
    assert report.dense["1"] == "excluded by the pattern '1'"


def test_roles_from_name_patterns_and_subclasses_left_alone():
    class Custom(nn.MultiheadAttention):
        pass

    model = nn.ModuleDict(
        {
            "attention": Custom(8, 2),
            "block": nn.ModuleDict(
                {"c_attn": nn.Linear(8, 24), "ffn": nn.Linear(8, 32), "other": nn.Linear(8, 16)}
            ),
        }
    )
    converted, report = mebp.convert(
        model, k=0.5, attention_k=1.0, mlp_k=4, skip_output=False, report=True
    )
    assert report.converted == {"block.c_attn": 24, "block.ffn": 4, "block.other": 8}
    assert "subclass of nn.MultiheadAttention" in report.dense["attention.in_proj"]
    roles = {e.name: e.role for e in report}
    assert roles["block.c_attn"] == "attention" and roles["block.ffn"] == "mlp"
    _, custom = mebp.convert(
        model, k=0.5, mlp_k=4, roles={"mlp": ["*.other"]}, skip_output=False, report=True
    )
    assert custom.converted["block.other"] == 4 and custom.converted["block.ffn"] == 16
    with pytest.raises(ValueError, match="roles"):
        mebp.convert(model, roles={"embedding": ["*"]})
    with pytest.raises(ValueError, match="block.ffn"):
        mebp.convert(model, mlp_k=33)


# ---------------------------------------------------------------------------------------------
# meSimp: the MLP width of transformer blocks


def masked_copy(model, keeps):
    """The unpruned model with each removed MLP neuron's output forced to zero."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, keep in keeps.items():
            layer = masked.get_submodule(name)
            removed = torch.ones(layer.out_features, dtype=torch.bool)
            removed[keep] = False
            layer.weight[removed] = 0
            layer.bias[removed] = 0
    return masked


def train_lm(model, optimizer, steps=3, vocab=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (4, 7), generator=generator)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer_name", ["adamw", "rowadamw"])
def test_simplifier_prunes_mlp_width_of_two_blocks(tmp_path, optimizer_name):
    model = TinyGPT()
    sparse = optimizer_name == "rowadamw"
    model = mebp.convert(model, k=0.25, grad="sparse" if sparse else "dense", inplace=True)
    optimizer = (mebp.RowAdamW if sparse else torch.optim.AdamW)(model.parameters(), lr=1e-2)
    simp = Simplifier(model, threshold=0.3, optimizer=optimizer)
    mlps = ["blocks.0.mlp.0", "blocks.1.mlp.0"]
    assert simp.layers == mlps
    assert simp.consumers == {name: [name[:-1] + "2"] for name in mlps}
    assert "not element-wise" in simp.skipped["blocks.0.attn.qkv"]
    assert "not element-wise" in simp.skipped["blocks.0.mlp.2"]
    train_lm(model, optimizer)
    keeps = {}
    for name in mlps:
        layer = model.get_submodule(name)
        keeps[name] = [j for j in range(40) if layer.hits[j] >= 0.3 * layer.refs]
    masked = masked_copy(model, keeps)
    report = simp.prune()
    assert report == {name: (40, len(keeps[name])) for name in mlps}
    assert all(new < 40 for _, new in report.values())
    for name in mlps:
        second = model.get_submodule(name[:-1] + "2")
        assert second.weight.shape == (16, len(keeps[name])) and second.out_features == 16
        assert optimizer.state[model.get_submodule(name).weight]["exp_avg"].shape[0] == len(
            keeps[name]
        )
    tokens = torch.randint(0, 11, (3, 6))
    model.eval()
    masked.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), masked(tokens), atol=1e-5, rtol=1e-5)
    train_lm(model, optimizer, seed=1)  # the optimizer steps on the compacted parameters
    assert all(torch.isfinite(p).all() for p in model.parameters())
    path = tmp_path / "small.pt"
    save_simplified(model, path)
    fresh = load_simplified(mebp.convert(TinyGPT(), k=0.25), path)
    assert fresh.blocks[1].mlp[0].weight.shape == model.blocks[1].mlp[0].weight.shape
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(tokens), model(tokens))


def test_simplifier_prunes_torch_transformer_encoder(tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    16, 2, 32, dropout=0.0, batch_first=True, activation="gelu"
                ),
                2,
                enable_nested_tensor=False,
            )
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.encoder(x))

    model = mebp.convert(Encoder(), k=0.25, inplace=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = Simplifier(model, threshold=0.3, optimizer=optimizer)
    mlps = ["encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    assert simp.layers == mlps
    assert "attention is not simplified" in simp.skipped["encoder.layers.0.self_attn.out_proj"]
    x = torch.randn(4, 5, 16)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
    keeps = {
        name: (model.get_submodule(name).hits >= 0.3 * model.get_submodule(name).refs)
        .nonzero()
        .flatten()
        for name in mlps
    }
    masked = masked_copy(model, keeps)
    report = simp.prune()
    assert report == {name: (32, len(keeps[name])) for name in mlps}
    assert any(new < 32 for _, new in report.values())
    torch.testing.assert_close(model(x), masked(x), atol=1e-5, rtol=1e-5)
    optimizer.zero_grad()
    model(x).pow(2).sum().backward()
    optimizer.step()
    path = tmp_path / "encoder.pt"
    save_simplified(model, path)
    fresh = load_simplified(Encoder(), path)
    torch.testing.assert_close(fresh(x), model(x))


def test_decoder_layers_convert_and_their_mlps_are_pruned():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2
            )
            self.head = nn.Linear(16, 3)

        def forward(self, tgt, memory):
            return self.head(self.decoder(tgt, memory))

    model = Decoder()
    converted, report = mebp.convert(model, k=0.25, report=True)
    assert {
        "decoder.layers.1.multihead_attn.in_proj",
        "decoder.layers.1.self_attn.in_proj",
        "decoder.layers.1.linear2",
    } <= report.converted.keys()
    tgt, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    torch.testing.assert_close(converted(tgt, memory), model(tgt, memory))
    converted(tgt, memory).sum().backward()
    cross = converted.decoder.layers[0].multihead_attn.in_proj_weight.grad
    assert cross[:16].ne(0).any(1).sum() == 4 and cross[16:].ne(0).any(1).sum() == 8
    simp = Simplifier(converted, threshold=0.3)
    assert simp.layers == ["decoder.layers.0.linear1", "decoder.layers.1.linear1"]


def test_bare_encoder_stack_is_pruned_and_its_inference_fast_path_agrees(monkeypatch):
    stack = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
        2,
        enable_nested_tensor=False,
    )
    model = mebp.convert(stack, k=0.25)
    simp = Simplifier(model, threshold=0.3)
    assert simp.layers == ["layers.0.linear1", "layers.1.linear1"]
    x = torch.randn(3, 5, 16)
    model(x).sum().backward()
    assert simp.prune() == {"layers.0.linear1": (32, 8), "layers.1.linear1": (32, 8)}
    expected = model(x).detach()  # training mode: the Python forward with MeMultiheadAttention
    fused = []
    original = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(
        torch,
        "_transformer_encoder_layer_fwd",
        lambda *a, **kw: fused.append(1) or original(*a, **kw),
    )
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert len(fused) == 2  # PyTorch's fused inference path ran on the compacted layers
