"""Inference kernels (linear + bias + activation epilogue, fused whole MLP) and
optimize_for_inference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_mebp as mebp
from aot import check_results, compile_specs, config_indices
from conftest import DEVICE, KERNEL_DTYPES, SHAPES, assert_close
from triton_mebp import backend, torch_ops
from triton_mebp.inference import FusedLinear, FusedMLP, optimize_for_inference
from triton_mebp.kernels import fused_mlp as fm


@pytest.fixture(params=["torch", "triton"])
def ops(request):
    return torch_ops if request.param == "torch" else backend.triton_ops()


REFERENCE_ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
}


def reference_mlp(x, weights, biases, hidden, output):
    h = x.double()
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = F.linear(h, w.double(), None if b is None else b.double())
        h = REFERENCE_ACTIVATIONS[output if i == len(weights) - 1 else hidden](h)
    return h


def random_layers(widths, dtype, bias=True):
    weights = [
        (torch.randn(n_out, n_in) / n_in**0.5).to(DEVICE, dtype)
        for n_in, n_out in zip(widths[:-1], widths[1:])
    ]
    biases = [torch.randn(n_out).to(DEVICE, dtype) if bias else None for n_out in widths[1:]]
    return weights, biases


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_act_matches_float64_reference(ops, shape, dtype):
    B, K, N = shape
    for i, activation in enumerate(fm.ACTIVATIONS):
        (weight,), (bias,) = random_layers((K, N), dtype, bias=i % 2 == 0)
        x = torch.randn(B, K, device=DEVICE, dtype=dtype)
        y = ops.linear_act(x, weight, bias, activation)
        assert y.dtype == dtype and y.shape == (B, N)
        assert_close(y, reference_mlp(x, [weight], [bias], "identity", activation), dtype)


def test_linear_act_strided_inputs():
    x_t = torch.randn(40, 9, device=DEVICE).t()  # 9 x 40, column-major
    weight = torch.randn(30, 80, device=DEVICE)[:, ::2]  # 30 x 40, stride 2 along K
    bias = torch.randn(60, device=DEVICE)[::2]
    y = fm.linear_act(x_t, weight, bias, "tanh")
    assert_close(y, reference_mlp(x_t, [weight], [bias], "identity", "tanh"), torch.float32)
    with pytest.raises(ValueError, match="activation"):
        fm.linear_act(x_t, weight, bias, "softmax")
    with pytest.raises(ValueError, match="do not match"):
        fm.linear_act(x_t, weight[:, :7], bias)


FUSED_CASES = [  # (widths, hidden activation, output activation, bias, batch)
    ((33, 20, 12, 5), "relu", "identity", True, 7),
    ((7, 1, 3), "tanh", "sigmoid", False, 1),
    ((16, 64, 64, 10), "gelu", "identity", True, 33),
    ((5, 17, 9, 31, 2), "sigmoid", "relu", True, 6),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_mlp_matches_float64_reference(ops, case, dtype):
    widths, hidden, output, bias, batch = case
    weights, biases = random_layers(widths, dtype, bias)
    width = fm.fused_width(widths[1:])
    packed_w, packed_b = fm.pack_layers(weights[1:], biases[1:], width)
    first_bias = biases[0] if bias else torch.zeros(widths[1], device=DEVICE, dtype=dtype)
    x = torch.randn(batch, widths[0], device=DEVICE, dtype=dtype)
    y = ops.fused_mlp(x, weights[0], first_bias, packed_w, packed_b, widths[-1], hidden, output)
    assert y.shape == (batch, widths[-1]) and y.dtype == dtype
    assert_close(y, reference_mlp(x, weights, biases, hidden, output), dtype)


WIDE_CASES = [  # width 256 after padding: one pair of packed layers; a pair and a last layer
    ((24, 200, 130, 3), "relu", "identity"),
    ((24, 256, 130, 150, 5), "gelu", "tanh"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", WIDE_CASES)
def test_fused_mlp_wide(case, dtype):
    widths, hidden, output = case
    weights, biases = random_layers(widths, dtype)
    width = fm.fused_width(widths[1:])
    assert width == 256 and fm.fused_mlp_fits(list(widths[1:]), dtype)
    packed_w, packed_b = fm.pack_layers(weights[1:], biases[1:], width)
    x = torch.randn(5, 48, device=DEVICE, dtype=dtype)[:, ::2]  # strided
    first_bias = torch.randn(2 * widths[1], device=DEVICE, dtype=dtype)[::2]
    biases[0] = first_bias
    y = fm.fused_mlp(x, weights[0], first_bias, packed_w, packed_b, widths[-1], hidden, output)
    assert_close(y, reference_mlp(x, weights, biases, hidden, output), dtype)


def test_fused_mlp_wide_bf16(bf16_dot):
    widths, hidden, output = WIDE_CASES[1]
    weights, biases = random_layers(widths, torch.bfloat16)
    packed_w, packed_b = fm.pack_layers(weights[1:], biases[1:], fm.fused_width(widths[1:]))
    x = torch.randn(9, widths[0], device=DEVICE, dtype=torch.bfloat16)
    y = fm.fused_mlp(x, weights[0], biases[0], packed_w, packed_b, widths[-1], hidden, output)
    assert_close(y, reference_mlp(x, weights, biases, hidden, output), torch.bfloat16)


def test_fused_mlp_limits():
    assert not fm.fused_mlp_fits([300, 10], torch.float16)
    assert not fm.fused_mlp_fits([64], torch.float16)  # one layer: nothing to fuse
    weights, biases = random_layers((24, 20, 12, 3), torch.float32)
    packed_w, packed_b = fm.pack_layers(weights[1:], biases[1:], 32)
    x = torch.randn(5, 24, device=DEVICE)
    with pytest.raises(ValueError, match="do not match"):
        fm.fused_mlp(x[:, :20], weights[0], biases[0], packed_w, packed_b, 3)
    for bad_w, bad_b in (  # not a power of two; not square; too wide
        fm.pack_layers(weights[1:], biases[1:], 24),
        (packed_w[:, :, :16], packed_b),
        fm.pack_layers(weights[1:], biases[1:], 512),
    ):
        with pytest.raises(ValueError, match="power-of-two width"):
            fm.fused_mlp(x, weights[0], biases[0], bad_w.contiguous(), bad_b, 3)


def make_model(widths, activation=nn.ReLU, dropout=True):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(activation())
            if dropout:
                layers.append(nn.Dropout(0.5))
    return mebp.convert(nn.Sequential(*layers).to(DEVICE), k=0.5)


def test_cpu_model_stays_plain_pytorch():
    model = make_model((12, 16, 8, 3))
    result = optimize_for_inference(model, kernels=False)
    assert model.training and isinstance(model[0], mebp.MeLinear)  # the input is not modified
    assert not result.training
    assert not any(isinstance(m, (mebp.MeLinear, FusedLinear, FusedMLP)) for m in result.modules())
    assert not any(p.requires_grad for p in result.parameters())
    x = torch.randn(4, 12, device=DEVICE)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    expected = reference_mlp(
        x, [m.weight for m in linears], [m.bias for m in linears], "relu", "identity"
    )
    with torch.no_grad():
        assert_close(result(x), expected)


def test_optimize_for_inference_uses_kernels(triton_backend):
    model = make_model((12, 16, 8, 3))
    result = optimize_for_inference(model)
    fused = [m for m in result.modules() if isinstance(m, FusedMLP)]
    assert len(fused) == 1 and [w.shape[0] for w in fused[0].weights] == [16, 8, 3]
    x = torch.randn(2, 5, 12, device=DEVICE)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert_close(result(x), expected, torch.float32)
    # an input that needs a gradient takes the PyTorch path, which has a backward
    x.requires_grad_(True)
    result(x).sum().backward()
    assert x.grad is not None
    with pytest.raises(RuntimeError):  # a dtype PyTorch rejects is rejected here too
        result(x.detach().double())


def test_mixed_and_wide_chains(triton_backend):
    layers = [
        nn.Linear(6, 300),
        nn.ReLU(),
        nn.Linear(300, 16),
        nn.Tanh(),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 5),
        nn.LayerNorm(5),
        nn.Linear(5, 4),
        nn.Sigmoid(),
    ]
    model = nn.Sequential(*layers).to(DEVICE)
    result = optimize_for_inference(model)
    kinds = [type(m).__name__ for m in result]
    # the 300-wide layer alone; tanh then relu hidden activations split the rest
    assert kinds == ["FusedLinear", "FusedMLP", "FusedLinear", "LayerNorm", "FusedLinear"], kinds
    assert result[0].activation == "relu" and result[4].activation == "sigmoid"
    x = torch.randn(3, 6, device=DEVICE)
    with torch.no_grad():
        assert_close(result(x), model(x), torch.float32)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.outer = nn.Sequential(
            nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 8)), nn.ReLU(), nn.Linear(8, 4)
        )

    def forward(self, x):
        return self.outer(x) * 2


def test_nested_sequentials_are_fused(triton_backend):
    model = Wrapper().to(DEVICE)
    result = optimize_for_inference(model)
    assert (
        isinstance(result.outer[0][0], FusedMLP) and result.outer[0][0].hidden_activation == "gelu"
    )
    assert isinstance(result.outer[2], FusedLinear)
    assert isinstance(model.outer[0][0], nn.Linear)  # the input model is not modified
    x = torch.randn(3, 5, device=DEVICE)
    with torch.no_grad():
        assert_close(result(x), model(x), torch.float32)


def test_fused_modules_reject_bad_chains():
    with pytest.raises(ValueError, match="at least 2"):
        FusedMLP([nn.Linear(3, 4)])
    with pytest.raises(ValueError, match="reads 5"):
        FusedMLP([nn.Linear(3, 4), nn.Linear(5, 2)])
    with pytest.raises(ValueError, match="activation"):
        FusedLinear(nn.Linear(3, 4), "swish")


def _signature(names, dtype):
    return {n: (f"*{dtype}" if n.endswith("_ptr") else "i32") for n in names}


def test_aot_compile_inference_kernels():
    linear_args = [
        "x_ptr",
        "w_ptr",
        "b_ptr",
        "y_ptr",
        "B",
        "N",
        "K",
        "B_BUCKET",
        "stride_xb",
        "stride_xk",
        "stride_wn",
        "stride_wk",
        "stride_bn",
        "stride_yb",
        "stride_yn",
    ]
    fused_args = [
        "x_ptr",
        "w_first_ptr",
        "b_first_ptr",
        "w_rest_ptr",
        "b_rest_ptr",
        "y_ptr",
        "B",
        "K",
        "H_FIRST",
        "N_OUT",
        "stride_xb",
        "stride_xk",
        "stride_wn",
        "stride_wk",
        "stride_bn",
        "stride_yb",
        "stride_yn",
    ]
    module = "triton_mebp.kernels.fused_mlp"
    specs = [
        {
            "kernel": f"{module}:linear_act_kernel",
            "label": "bf16 gelu bias",
            "signature": _signature(linear_args, "bf16"),
            "constexprs": {"HAS_BIAS": True, "ACTIVATION": "gelu", "INPUT_PRECISION": "ieee"},
        },
        {
            "kernel": f"{module}:linear_act_kernel",
            "label": "fp32 relu",
            "signature": _signature(linear_args, "fp32"),
            "constexprs": {"HAS_BIAS": False, "ACTIVATION": "relu", "INPUT_PRECISION": "tf32"},
        },
        {
            "kernel": f"{module}:fused_mlp_kernel",
            "label": "bf16 width 64",
            "signature": _signature(fused_args, "bf16"),
            "constexprs": {
                "NUM_REST": 2,
                "WIDTH": 64,
                "HIDDEN_ACTIVATION": "tanh",
                "OUTPUT_ACTIVATION": "sigmoid",
                "INPUT_PRECISION": "ieee",
            },
        },
        {
            "kernel": f"{module}:fused_mlp_kernel",
            "label": "fp16 width 256",
            "signature": _signature(fused_args, "fp16"),
            "constexprs": {
                "NUM_REST": 3,
                "WIDTH": 256,
                "HIDDEN_ACTIVATION": "relu",
                "OUTPUT_ACTIVATION": "identity",
                "INPUT_PRECISION": "ieee",
            },
        },
    ]
    # the configs the pruner keeps for these widths and dtypes
    for spec, dtype, width in ((specs[2], torch.bfloat16, 64), (specs[3], torch.float16, 256)):
        args = {"x_ptr": torch.empty(1, 1, dtype=dtype), "w_rest_ptr": torch.empty(1, width, width)}
        spec["configs"] = config_indices(fm.fused_mlp_kernel, args)
    results = compile_specs(specs)
    check_results(results)
    expected = 2 * (
        2 * len(fm.linear_act_kernel.configs) + len(specs[2]["configs"]) + len(specs[3]["configs"])
    )
    assert len(results) == expected
    # tensor-core dots on both targets
    assert all(r["mma"] for r in results)
