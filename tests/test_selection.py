"""Top-k selection: Triton kernels (interpreted without a GPU) and the PyTorch path."""

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES, TOLERANCES, assert_close
from reference import is_valid_topk
from triton_mebp import backend, torch_ops

CASES = [
    (1, 1, 1),
    (1, 7, 1),
    (1, 7, 7),
    (7, 33, 5),
    (33, 257, 1),
    (4, 257, 257),
    (3, 1000, 31),
    (2, 5000, 2500),
]


def kernel_ops():
    return backend.triton_ops()


@pytest.fixture(params=["torch", "triton"])
def ops(request):
    return torch_ops if request.param == "torch" else kernel_ops()


@pytest.fixture(params=["v1", "v2"])
def kernel_version(request, monkeypatch):
    """The Triton selection kernels of each generation (TRITON_MEBP_KERNELS)."""
    monkeypatch.setenv("TRITON_MEBP_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,N,k", CASES)
def test_unified_selects_top_columns(ops, B, N, k, dtype):
    dy = torch.randn(B, N, device=DEVICE).to(dtype)
    hits = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    idx, dy_c, db = ops.unified_select_and_bias(dy, k, hits)
    assert is_valid_topk(dy.double().abs().sum(0), idx, k)
    assert dy_c.shape == (B, k) and dy_c.dtype == dtype and dy_c.stride(1) == 1
    assert torch.equal(dy_c, dy[:, idx.long()])
    assert db.dtype == dtype
    assert_close(db, dy.double().sum(0), dtype)
    expected_hits = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    expected_hits[idx.long()] = B
    assert torch.equal(hits, expected_hits)


@pytest.mark.parametrize("B,N,k", [(3, 100, 7), (65, 130, 64)])
def test_kernel_generations_agree(kernel_version, B, N, k):
    dy = torch.randn(B, N, device=DEVICE)
    hits = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    idx, dy_c, db = kernel_ops().unified_select_and_bias(dy, k, hits)
    assert is_valid_topk(dy.double().abs().sum(0), idx, k)
    assert torch.equal(dy_c, dy[:, idx.long()])
    assert_close(db, dy.double().sum(0))
    assert torch.equal(hits.nonzero().flatten(), idx.long())
    values, rows_idx = kernel_ops().per_example_select(dy[:3], k)
    assert torch.equal(values, dy[:3].gather(1, rows_idx.long()))
    for b in range(3):
        assert is_valid_topk(dy[b].double().abs(), rows_idx[b], k), f"row {b}"


@pytest.mark.parametrize("k", [1, 63, 64, 65, 130])
def test_v2_pads_the_compacted_rows_with_zeros(monkeypatch, k):
    monkeypatch.setenv("TRITON_MEBP_KERNELS", "v2")
    dy = torch.randn(5, 200, device=DEVICE) + 10.0  # no zeros anywhere
    idx, dy_c = kernel_ops().unified_select(dy, k)
    padded = dy_c._base
    width = -(-k // 64) * 64
    assert padded.shape == (5, width) and dy_c.stride(0) == width
    assert torch.equal(padded[:, :k], dy[:, idx.long()])
    assert not padded[:, k:].any()


def test_bias_pass_is_deterministic():
    dy = torch.randn(300, 40, device=DEVICE) * 1e3
    first = kernel_ops().unified_select_and_bias(dy, 5)[2]
    for _ in range(2):
        assert torch.equal(kernel_ops().unified_select_and_bias(dy, 5)[2], first)


def test_unknown_kernel_generation_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_MEBP_KERNELS", "v3")
    with pytest.raises(ValueError, match="TRITON_MEBP_KERNELS"):
        kernel_ops().unified_select(torch.randn(2, 8, device=DEVICE), 1)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("B,N,k", CASES)
def test_per_example_selects_top_entries_of_each_row(ops, B, N, k, dtype):
    dy = torch.randn(B, N, device=DEVICE).to(dtype)
    hits = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    values, idx = ops.per_example_select(dy, k, hits)
    assert values.shape == idx.shape == (B, k)
    for b in range(B):
        assert is_valid_topk(dy[b].double().abs(), idx[b], k), f"row {b}"
    assert torch.equal(values, dy.gather(1, idx.long()))
    expected_hits = torch.bincount(idx.reshape(-1).long().cpu(), minlength=N)
    assert torch.equal(hits.cpu(), expected_hits)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_selection_reads_strided_gradients(ops, layout):
    base = torch.randn(40, 30, device=DEVICE)
    dy = base.t() if layout == "transposed" else base[::3, ::2]
    assert not dy.is_contiguous()
    idx, dy_c = ops.unified_select(dy, 6)
    assert is_valid_topk(dy.double().abs().sum(0), idx, 6)
    assert torch.equal(dy_c, dy[:, idx.long()])
    values, rows_idx = ops.per_example_select(dy, 4)
    assert torch.equal(values, dy.gather(1, rows_idx.long()))
    for b in range(dy.shape[0]):
        assert is_valid_topk(dy[b].double().abs(), rows_idx[b], 4)


def test_kernel_ties_go_to_lowest_positions():
    dy = torch.zeros(3, 50, device=DEVICE)
    dy[:, 40] = 1.0
    idx, _ = kernel_ops().unified_select(dy, 5)
    assert idx.tolist() == [0, 1, 2, 3, 40]
    _, rows_idx = kernel_ops().per_example_select(dy, 3)
    assert rows_idx.tolist() == [[0, 1, 40]] * 3


def test_nan_and_inf_are_always_selected(ops):
    dy = torch.randn(4, 64, device=DEVICE) * 1e-3
    dy[1, 10] = float("nan")
    dy[2, 50] = float("-inf")
    idx, _ = ops.unified_select(dy, 2)
    assert sorted(idx.tolist()) == [10, 50]
    _, rows_idx = ops.per_example_select(dy, 1)
    assert rows_idx[1].item() == 10 and rows_idx[2].item() == 50


@pytest.mark.parametrize("k", [1, 4097, 131072])
def test_kernel_selection_reaches_wide_rows(k):
    N = 131072
    dy = torch.randn(2, N, device=DEVICE)
    idx, dy_c = kernel_ops().unified_select(dy, k)
    assert is_valid_topk(dy.double().abs().sum(0), idx, k)
    assert torch.equal(dy_c, dy[:, idx.long()])
    values, rows_idx = kernel_ops().per_example_select(dy[:1], k)
    assert is_valid_topk(dy[0].double().abs(), rows_idx[0], k)


def test_selection_leaves_its_input_alone(ops):
    dy = torch.randn(5, 40, device=DEVICE)
    before = dy.clone()
    ops.unified_select(dy, 3)
    ops.per_example_select(dy, 3)
    assert torch.equal(dy, before)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_per_example_nan_in_half_precision_keys(ops, dtype):
    dy = torch.randn(3, 40, device=DEVICE).to(dtype)
    dy[0, 5] = dy[0, 7] = dy[0, 9] = float("nan")
    dy[1, 3] = float("inf")
    values, idx = ops.per_example_select(dy, 2)
    assert idx[0].tolist() == [5, 7]
    assert 3 in idx[1].tolist()
    assert torch.equal(values[1:], dy[1:].gather(1, idx[1:].long()))


# The wide unified search (several programs per pass, kernels/selection.py) at small sizes: slices
# of 64 scores from 256 columns on. No tl.dot is involved, so bf16 runs in the interpreter too.
SPLIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def split_calls(monkeypatch):
    """The v2 kernels; yields the row widths the split search ran on."""
    from triton_mebp.kernels import selection

    monkeypatch.setenv("TRITON_MEBP_KERNELS", "v2")
    widths = []
    original = selection._top_columns_split

    def spy(scores, *args):
        widths.append(scores.shape[0])
        return original(scores, *args)

    monkeypatch.setattr(selection, "_top_columns_split", spy)
    return widths


@pytest.fixture
def split_search(split_calls, monkeypatch):
    """The split search from 256 columns on, in slices of 64 scores."""
    from triton_mebp.kernels import selection

    monkeypatch.setattr(selection, "SPLIT_MIN_COLUMNS", 256)
    monkeypatch.setattr(selection, "SPLIT_SLICE", 64)
    return split_calls


def _check_against_torch_ops(dy, k):
    """The kernels' (idx, dy_c, db, hits) equal the PyTorch path's (idx exactly)."""
    B, N = dy.shape
    hits = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    idx, dy_c, db = kernel_ops().unified_select_and_bias(dy, k, hits)
    expected_hits = torch.zeros(N, dtype=torch.int64, device=DEVICE)
    expected_idx, expected_dy_c, _ = torch_ops.unified_select_and_bias(dy, k, expected_hits)
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(dy_c, expected_dy_c, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(hits, expected_hits)
    expected_db = dy.double().sum(0)
    torch.testing.assert_close(db.double(), expected_db, **TOLERANCES[dy.dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", SPLIT_DTYPES)
@pytest.mark.parametrize("N,k", [(256, 1), (300, 299), (300, 300), (1000, 31), (2100, 1050)])
@pytest.mark.parametrize("data", ["random", "ties"])
def test_split_search_selects_what_torch_ops_selects(split_search, data, N, k, dtype):
    if data == "random":  # one row: the column scores are |dy| exactly, on both paths
        dy = torch.randn(1, N, device=DEVICE).to(dtype)
    else:  # few distinct small integers: many equal scores and zero columns, summed exactly
        dy = torch.randint(-1, 2, (3, N), device=DEVICE).to(dtype)
        dy[:, N // 3 :] = 0
    _check_against_torch_ops(dy, k)
    assert split_search == [N]


@pytest.mark.parametrize("k", [1, 5, 40, 250, 397, 400])
def test_split_search_orders_nan_inf_and_zeros_as_torch_ops(split_search, k):
    dy = torch.zeros(2, 400, device=DEVICE)
    dy[:, 100:300] = torch.randint(1, 4, (2, 200), device=DEVICE).float()
    dy[0, [7, 333]] = float("nan")
    dy[1, [20, 390]] = float("inf")
    dy[1, 7] = float("-inf")
    _check_against_torch_ops(dy, k)
    assert split_search == [400]


@pytest.mark.parametrize("max_programs", [3, 256])
@pytest.mark.parametrize("k", [1, 77, 1999])
def test_split_and_one_program_searches_agree(split_search, monkeypatch, max_programs, k):
    from triton_mebp.kernels import selection

    monkeypatch.setattr(selection, "SPLIT_MAX_PROGRAMS", max_programs)  # 3: slices of 704
    dy = torch.randn(5, 2000, device=DEVICE)
    dy[:, ::7] = dy[:, :1]  # equal columns straddling any threshold
    dy[:, 1500:1600] = 0
    hits = torch.zeros(2000, dtype=torch.int64, device=DEVICE)
    split = kernel_ops().unified_select_and_bias(dy, k, hits)
    assert split_search == [2000]
    monkeypatch.setattr(selection, "SPLIT_MIN_COLUMNS", 10**9)
    one_program = kernel_ops().unified_select_and_bias(dy, k)
    assert split_search == [2000]
    assert torch.equal(split[0], one_program[0])
    assert is_valid_topk(dy.double().abs().sum(0), split[0], k)
    assert torch.equal(hits.nonzero().flatten(), split[0]) and bool((hits[split[0]] == 5).all())


def test_split_search_at_a_vocabulary_width(split_calls):
    N = 65536  # the default split: 32 slices of 2048 scores
    dy = torch.randint(-2, 3, (2, N), device=DEVICE).float()
    _check_against_torch_ops(dy, 20000)
    assert split_calls == [N]
