"""Shared test set-up: device, dtypes, tolerances, shapes, seeds.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; that must be chosen
before any kernel module is imported, hence the environment is set here, at collection.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_MEBP_AUTOTUNE", "0")
# The gathered products on the Triton kernels unless a test picks cuBLAS (TRITON_MEBP_PRODUCTS).
os.environ.setdefault("TRITON_MEBP_PRODUCTS", "triton")

import triton_mebp as mebp  # noqa: E402  (after the interpreter switch)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# Dtypes the kernels are tested in. The interpreter gets bf16 arithmetic wrong (tl.dot multiplies
# the raw bit patterns): GPU only here; tests/test_dtypes.py runs bf16 with the `bf16_dot` fixture.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=1e-1, rtol=5e-2),
}

# (batch, in_features, out_features): ones, primes, non-powers of two.
SHAPES = [(1, 1, 1), (1, 7, 33), (7, 33, 257), (33, 16, 7), (5, 64, 131), (2, 257, 17)]


def assert_close(actual, expected, dtype=None):
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.to(expected.dtype), expected, **TOLERANCES[dtype])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_backend():
    """Run meProp layers on the Triton kernels (interpreted on CPU) for the test's duration."""
    before = mebp.get_backend()
    mebp.set_backend("triton")
    yield DEVICE
    mebp.set_backend(before)


@pytest.fixture(params=["torch", "triton"])
def any_backend(request):
    """Each test runs once on the PyTorch-ops backend and once on the Triton kernels."""
    before = mebp.get_backend()
    mebp.set_backend(request.param)
    yield request.param
    mebp.set_backend(before)


@pytest.fixture
def bf16_dot(monkeypatch):
    """Under the interpreter, ``tl.dot`` of bfloat16 operands computed on their values.

    Triton's interpreter stores bfloat16 as uint16 bit patterns and its dot multiplies those
    integers (the compiled kernels use bf16 x bf16 -> fp32 MMA instructions); this widens the
    operands to float32 first, so the kernels' bf16 loads, masks and stores can be tested. Its
    float32 -> bfloat16 conversion truncates; compiled code rounds to nearest even, and so does
    this fixture's (autocast's products cast float32 tiles of W and x to bf16 in the kernels).
    """
    if not os.environ.get("TRITON_INTERPRET") == "1":
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widened(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        values = (handle.data.astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(values, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if d.dtype.scalar == tl.bfloat16:
            raise NotImplementedError("bf16 accumulators are not widened")
        return original(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return original_cast(self, src, dst_type)
        bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
        nearest_even = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        nan = np.isnan(src.data)
        rounded = np.where(nan, (bits >> 16) | 0x40, nearest_even).astype(np.uint16)
        return interpreter.TensorHandle(rounded, tl.bfloat16)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)
    yield
