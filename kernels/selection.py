"""Top-k gradient selection ("masks") on the GPU.

Selection works on a monotone integer key of each score, so it needs no sort and no ``tl.topk``
and reaches any row width: a radix search finds the k-th largest key (``RADIX_BITS`` bits of it per
pass over the row), then one ordered pass writes the selected positions ascending. Ties at the
threshold go to the lowest positions. NaN ranks above +inf, as in ``torch.topk``, so a NaN
gradient is always kept and reaches ``dx`` and ``dW`` as it would in dense back propagation.

- unified: ``s[n] = sum_b |dy[b, n]|`` (one pass over ``dy``), one index set for the batch, and
  the compacted ``dy[:, idx]``;
- per example: each row of ``dy`` keeps its own top-k of ``|dy[b, :]|``.
"""
import torch
import triton
import triton.language as tl

from ._checks import check_dtypes
from ._tuning import TunedKernel, pow2_bucket

RADIX_BITS = 4


@triton.jit
def _score_key(score):
    """Order-preserving int32 key of a non-negative float32 score; NaN maps above +inf."""
    bits = score.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(score != score, 0x7FFFFFFF, bits)


@triton.jit
def _load_keys(src_ptr, offs, n, stride):
    """Keys of |src[offs]|; positions past the row get -1, below every real key."""
    mask = offs < n
    raw = tl.load(src_ptr + offs.to(tl.int64) * stride, mask=mask, other=0.0)
    key = _score_key(tl.abs(raw.to(tl.float32)))
    return raw, tl.where(mask, key, -1)


@triton.jit
def _select_row(src_ptr, n, stride, k, idx_out_ptr, val_out_ptr, hits_ptr, hit_increment,
                STORE_VALUES: tl.constexpr, COUNT_HITS: tl.constexpr, ATOMIC_HITS: tl.constexpr,
                BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Writes the positions of the k largest |src| of one row, ascending, to idx_out_ptr."""
    # Radix search for the k-th largest key: the largest T with count(key >= T) >= k.
    digits = tl.arange(0, 1 << RADIX_BITS)
    threshold = 0
    for pass_ in tl.static_range(32 // RADIX_BITS):
        candidates = threshold | (digits << (32 - RADIX_BITS * (pass_ + 1)))
        counts = tl.zeros([1 << RADIX_BITS], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            _, key = _load_keys(src_ptr, start + tl.arange(0, BLOCK), n, stride)
            counts += tl.sum((key[None, :] >= candidates[:, None]).to(tl.int32), axis=1)
        # Candidates with the sign bit set are past every key (keys are below 2**31).
        digit = tl.max(tl.where((counts >= k) & (candidates >= 0), digits, 0), axis=0)
        threshold = threshold | (digit << (32 - RADIX_BITS * (pass_ + 1)))

    above = 0
    for start in range(0, n, BLOCK):
        _, key = _load_keys(src_ptr, start + tl.arange(0, BLOCK), n, stride)
        above += tl.sum((key > threshold).to(tl.int32), axis=0)
    ties_wanted = k - above

    # Ordered compaction: positions come out ascending.
    n_selected = 0
    n_ties = 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        raw, key = _load_keys(src_ptr, offs, n, stride)
        is_tie = (key == threshold).to(tl.int32)
        tie_rank = n_ties + tl.cumsum(is_tie, axis=0)
        selected = (key > threshold) | ((is_tie == 1) & (tie_rank <= ties_wanted))
        chosen = selected.to(tl.int32)
        slot = n_selected + tl.cumsum(chosen, axis=0) - 1
        tl.store(idx_out_ptr + slot, offs, mask=selected)
        if STORE_VALUES:
            tl.store(val_out_ptr + slot, raw, mask=selected)
        if COUNT_HITS:
            if ATOMIC_HITS:
                tl.atomic_add(hits_ptr + offs, tl.full([BLOCK], 1, tl.int64) * hit_increment,
                              mask=selected)
            else:
                old = tl.load(hits_ptr + offs, mask=selected, other=0)
                tl.store(hits_ptr + offs, old + hit_increment, mask=selected)
        n_selected += tl.sum(chosen, axis=0)
        n_ties += tl.sum(is_tie, axis=0)


@triton.jit
def _column_scores_kernel(dy_ptr, scores_ptr, B, N, stride_b, stride_n,
                          BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """scores[n] = sum_b |dy[b, n]|, accumulated in float32."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < B) & col_mask[None, :]
        ptrs = dy_ptr + rows[:, None].to(tl.int64) * stride_b + cols[None, :].to(tl.int64) * stride_n
        acc += tl.abs(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32))
    tl.store(scores_ptr + cols, tl.sum(acc, axis=0), mask=col_mask)


@triton.jit
def _unified_select_kernel(scores_ptr, idx_ptr, hits_ptr, N, k, hit_increment,
                           COUNT_HITS: tl.constexpr, BLOCK: tl.constexpr,
                           RADIX_BITS: tl.constexpr):
    _select_row(scores_ptr, N, 1, k, idx_ptr, idx_ptr, hits_ptr, hit_increment,
                False, COUNT_HITS, False, BLOCK, RADIX_BITS)


@triton.jit
def _gather_columns_kernel(dy_ptr, idx_ptr, out_ptr, B, K, stride_b, stride_n,
                           BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, j] = dy[b, idx[j]], out contiguous B x K."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot_mask = slots < K
    cols = tl.load(idx_ptr + slots, mask=slot_mask, other=0)
    mask = (rows[:, None] < B) & slot_mask[None, :]
    vals = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_b + cols[None, :].to(tl.int64) * stride_n,
                   mask=mask)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + slots[None, :], vals, mask=mask)


@triton.jit
def _per_example_select_kernel(dy_ptr, val_ptr, idx_ptr, hits_ptr, N, k, stride_b, stride_n,
                               COUNT_HITS: tl.constexpr, BLOCK: tl.constexpr,
                               RADIX_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _select_row(dy_ptr + row * stride_b, N, stride_n, k, idx_ptr + row * k, val_ptr + row * k,
                hits_ptr, 1, True, COUNT_HITS, True, BLOCK, RADIX_BITS)


def _prefer_block_near_width(configs, named_args):
    """Blocks no wider than the row (rounded up to a power of two), the widest first."""
    width = pow2_bucket(named_args["N"])
    fitting = [c for c in configs if c.kwargs["BLOCK"] <= max(width, 128)]
    return sorted(fitting, key=lambda c: -c.kwargs["BLOCK"])


def _select_configs():
    return [triton.Config({"BLOCK": block, "RADIX_BITS": RADIX_BITS}, num_warps=warps)
            for block in (128, 512, 2048, 4096) for warps in (4, 8) if block >= 32 * warps]


def _prune_scores(configs, named_args):
    # Few rows: a tall block would only load masked-out rows.
    rows = pow2_bucket(named_args["B"])
    fitting = [c for c in configs if c.kwargs["BLOCK_B"] <= max(rows, 8)]
    return fitting or configs[:1]


column_scores = TunedKernel(
    _column_scores_kernel,
    [triton.Config({"BLOCK_B": bb, "BLOCK_N": bn}, num_warps=w)
     for bb, bn, w in ((32, 64, 4), (8, 64, 4), (64, 32, 4), (16, 128, 4), (32, 128, 8), (64, 64, 8))],
    key=["N"],
    prune=_prune_scores,
)
unified_select_row = TunedKernel(_unified_select_kernel, _select_configs(), key=["N"],
                                 prune=_prefer_block_near_width, restore_value=["hits_ptr"])
gather_columns = TunedKernel(
    _gather_columns_kernel,
    [triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_warps=w)
     for bb, bk, w in ((32, 32, 4), (64, 16, 4), (16, 64, 4), (64, 64, 8))],
    key=["K"],
)
per_example_select_rows = TunedKernel(_per_example_select_kernel, _select_configs(), key=["N"],
                                      prune=_prefer_block_near_width, restore_value=["hits_ptr"])


def _no_hits(device):
    return torch.empty(1, dtype=torch.int64, device=device)


def unified_select(dy: torch.Tensor, k: int, hits: torch.Tensor | None = None):
    """Batch-shared top-k columns of ``dy`` (B x N) by ``sum_b |dy[b, n]|``.

    Returns ``(idx, dy_c)``: int64 column indices sorted ascending (k) and ``dy[:, idx]`` (B x k,
    contiguous). ``hits`` (int64, N), if given, gets B added at every selected column.
    """
    check_dtypes("unified_select", dy=dy)
    B, N = dy.shape
    scores = torch.empty(N, dtype=torch.float32, device=dy.device)
    column_scores[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
        dy, scores, B, N, dy.stride(0), dy.stride(1))
    idx = torch.empty(k, dtype=torch.int64, device=dy.device)
    count = hits is not None
    unified_select_row[(1,)](scores, idx, hits if count else _no_hits(dy.device), N, k, B,
                             COUNT_HITS=count)
    dy_c = torch.empty((B, k), dtype=dy.dtype, device=dy.device)
    if B > 0:
        gather_columns[lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(k, meta["BLOCK_K"]))](
            dy, idx, dy_c, B, k, dy.stride(0), dy.stride(1))
    return idx, dy_c


def per_example_select(dy: torch.Tensor, k: int, hits: torch.Tensor | None = None):
    """Top-k of ``|dy[b, :]|`` for each row b of ``dy`` (B x N).

    Returns ``(values, idx)``, both B x k: the signed entries of ``dy`` and their int64 column
    indices, ascending within each row. ``hits`` (int64, N), if given, gets 1 added per selection.
    """
    check_dtypes("per_example_select", dy=dy)
    B, N = dy.shape
    values = torch.empty((B, k), dtype=dy.dtype, device=dy.device)
    idx = torch.empty((B, k), dtype=torch.int64, device=dy.device)
    if B > 0:
        count = hits is not None
        per_example_select_rows[(B,)](dy, values, idx, hits if count else _no_hits(dy.device),
                                      N, k, dy.stride(0), dy.stride(1), COUNT_HITS=count)
    return values, idx
