"""load_simplified over broken checkpoints: a clear error and the model untouched, every time."""

import copy
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import triton_mebp as mebp
from triton_mebp.simplify import Simplifier, load_simplified, save_simplified

WIDTHS = (7, 16, 12, 3)


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(7, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)
    )
    return mebp.convert(model, k=4, inplace=True)


def pruned_checkpoint():
    """The checkpoint of a model pruned to narrower hidden layers, as a dict."""
    model = make_model()
    simp = Simplifier(model, threshold=0.3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        model(torch.randn(8, 7, generator=generator)).pow(2).sum().backward()
    report = simp.prune()
    assert all(new < old for old, new in report.values())
    buffer = io.BytesIO()
    save_simplified(model, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), buffer.getvalue()


CHECKPOINT, CHECKPOINT_BYTES = pruned_checkpoint()


def snapshot(model):
    return (
        [id(p) for p in model.parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [
            (
                m.out_features,
                m.in_features,
                getattr(m, "k", None),
                tuple(getattr(m, "hits", torch.zeros(0)).shape),
            )
            for m in model.modules()
            if isinstance(m, nn.Linear)
        ],
    )


def assert_unchanged(model, before):
    ids, state, shapes = snapshot(model)
    assert ids == before[0] and shapes == before[2]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)


def assert_refused(data: bytes):
    model = make_model()
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        load_simplified(model, io.BytesIO(data))
    assert str(error.value)
    assert_unchanged(model, before)
    return str(error.value)


def to_bytes(checkpoint):
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def test_the_unmutated_checkpoint_loads():
    model = make_model()
    load_simplified(model, io.BytesIO(CHECKPOINT_BYTES))
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [
        shape[0] for shape in CHECKPOINT["linear_shapes"].values()
    ]


# Mutations of the checkpoint dict; each leaves a checkpoint that does not fit.

LAYERS = ["0", "2", "4"]
BAD_WIDTHS = [
    lambda w: float(w),
    lambda w: str(w),
    lambda w: True,
    lambda w: -w,
    lambda w: 0,
    lambda w: w + 1,
    lambda w: 10**6,
    lambda w: None,
    lambda w: [w],
]
BAD_TENSORS = [
    lambda t: t.tolist(),
    lambda t: 1.5,
    lambda t: t[:-1],
    lambda t: t.unsqueeze(0),
    lambda t: t.to(torch.int64),
    lambda t: t.to(torch.complex64),
    lambda t: t.to_sparse(),
    lambda t: None,
    lambda t: torch.zeros(0),
]


def mutations():
    def top(value):
        return lambda c: value

    def drop(key):
        return lambda c: {k: v for k, v in c.items() if k != key}

    def put(key, value):
        return lambda c: {**c, key: value}

    def width(layer, position, bad):
        def mutate(c):
            shapes = copy.deepcopy(c["linear_shapes"])
            shapes[layer][position] = bad(shapes[layer][position])
            return {**c, "linear_shapes": shapes}

        return mutate

    def shapes(edit):
        return lambda c: {**c, "linear_shapes": edit(dict(c["linear_shapes"]))}

    def entry(key, bad):
        return lambda c: {**c, "state_dict": {**c["state_dict"], key: bad(c["state_dict"][key])}}

    def state(edit):
        return lambda c: {**c, "state_dict": edit(dict(c["state_dict"]))}

    found = [
        top(None),
        top([1, 2]),
        top(torch.zeros(3)),
        top("triton_mebp.simplified/1"),
        drop("format"),
        drop("linear_shapes"),
        drop("state_dict"),
        put("format", "triton_mebp.simplified/0"),
        put("linear_shapes", None),
        put("linear_shapes", [[16, 7]]),
        put("state_dict", None),
        put("state_dict", [1]),
        shapes(lambda s: {k: v for k, v in s.items() if k != "2"}),
        shapes(lambda s: {**s, "9": [3, 3]}),
        shapes(lambda s: {**s, 0: [16, 7]}),
        shapes(lambda s: {**s, "2": [12, 16, 1]}),
        shapes(lambda s: {**s, "2": (9,)}),
        state(lambda s: {k: v for k, v in s.items() if k != "2.bias"}),
        state(lambda s: {**s, "extra": torch.zeros(1)}),
        state(lambda s: {**s, 3: torch.zeros(1)}),
    ]
    found += [
        width(layer, position, bad) for layer in LAYERS for position in (0, 1) for bad in BAD_WIDTHS
    ]
    found += [entry(key, bad) for key in ("0.weight", "2.bias", "4.weight") for bad in BAD_TENSORS]
    return found


MUTATIONS = mutations()


@pytest.mark.parametrize("index", range(len(MUTATIONS)))
def test_each_mutation_is_refused_and_the_model_untouched(index):
    assert_refused(to_bytes(MUTATIONS[index](copy.copy(CHECKPOINT))))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, len(MUTATIONS) - 1), min_size=1, max_size=3, unique=True),
    st.one_of(st.none(), st.integers(0, len(CHECKPOINT_BYTES) - 1)),
)
def test_fuzz_mutations_and_truncations(indices, cut):
    checkpoint = copy.copy(CHECKPOINT)
    for index in indices:
        try:
            checkpoint = MUTATIONS[index](checkpoint)
        except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, NotImplementedError):
            pass  # an earlier mutation removed or changed what this one edits
    data = to_bytes(checkpoint)
    assert_refused(data if cut is None else data[:cut])


def test_truncated_and_empty_files_say_not_a_checkpoint(tmp_path):
    for data in (b"", CHECKPOINT_BYTES[:100], CHECKPOINT_BYTES[:-50], b"\x00" * 64):
        assert "not a triton_mebp checkpoint" in assert_refused(data)
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    model = make_model()
    with pytest.raises(ValueError, match=f"{path}: not a triton_mebp checkpoint"):
        load_simplified(model, path)
    with pytest.raises(FileNotFoundError):
        load_simplified(model, tmp_path / "missing.pt")
