"""Property tests over shapes, k and modes: meProp equals masked-dense back propagation."""

import contextlib

import torch
from hypothesis import given, settings, strategies as st

import triton_mebp as mebp
from conftest import DEVICE, assert_close
from reference import mebp_reference, selection_mask, separated_grad


@st.composite
def problems(draw):
    B = draw(st.integers(1, 9))
    M = draw(st.integers(1, 17))
    N = draw(st.integers(1, 40))
    k = draw(st.integers(1, N))
    mode = draw(st.sampled_from(["unified", "per_example"]))
    grad = draw(st.sampled_from(["dense", "sparse"]))
    seed = draw(st.integers(0, 2**16))
    return B, M, N, k, mode, grad, seed


def check(problem):
    B, M, N, k, mode, grad, seed = problem
    torch.manual_seed(seed)
    x = torch.randn(B, M, device=DEVICE, requires_grad=True)
    w = torch.randn(N, M, device=DEVICE, requires_grad=True)
    hits = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    dy = separated_grad(B, N, mode, device=DEVICE)
    mebp.mebp_linear(x, w, k=k, mode=mode, grad=grad, hits=hits).backward(dy)
    ref_dx, ref_dw, _ = mebp_reference(x, w, dy, k, mode)
    assert_close(x.grad, ref_dx)
    assert_close(w.grad.to_dense(), ref_dw)
    mask = selection_mask(dy, k, mode)
    assert torch.equal(hits.cpu(), mask.sum(0).cpu())
    if grad == "sparse":
        rows = w.grad.coalesce().indices()[0].cpu()
        assert torch.equal(rows, mask.any(0).nonzero().flatten().cpu())


@contextlib.contextmanager
def backend(name):
    before = mebp.get_backend()
    mebp.set_backend(name)
    try:
        yield
    finally:
        mebp.set_backend(before)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_torch_path_equals_masked_dense(problem):
    with backend("torch"):
        check(problem)


@settings(max_examples=25, deadline=None)
@given(problems())
def test_triton_path_equals_masked_dense(problem):
    with backend("triton"):
        check(problem)
