"""Top-k gradient selection ("masks") on the GPU.

Selection works on a monotone integer key of each score, so it needs no sort and no ``tl.topk``
and reaches any row width: a radix search finds the k-th largest key (``RADIX_BITS`` bits of it per
pass over the row), then one ordered pass writes the selected positions ascending. Ties at the
threshold go to the lowest positions. NaN ranks above +inf, as in ``torch.topk``, so a NaN
gradient is always kept and reaches ``dx`` and ``dW`` as it would in dense back propagation.

- unified: ``s[n] = sum_b |dy[b, n]|`` (one pass over ``dy``), one index set for the batch, and
  the compacted ``dy[:, idx]``;
- per example: each row of ``dy`` keeps its own top-k of ``|dy[b, :]|``.

Two generations, chosen by ``TRITON_MEBP_KERNELS`` (see ``_tuning.kernel_version``):

- v2 (default): one streaming pass over ``dy`` on a 2-D grid writes per-chunk partial column
  scores and bias sums, a second small pass adds the chunks in a fixed order (deterministic);
  the search takes 8 bits of the key per pass with ``tl.histogram`` (4 passes for float32 keys,
  2 for bfloat16 and 3 for float16 per-example keys, whose low bits are zero), with no separate
  count pass (from ``SPLIT_MIN_COLUMNS`` scores on, each pass's histogram is split over programs
  taking slices of the scores, a one-program step adds them and chooses the digit, and the
  compaction is split the same way, each slice writing at its own offset); ``dy_c`` rows are
  padded with zero columns to a multiple of 64 (a ``[:, :k]`` view of the padded buffer) so that
  the products load aligned tiles; hit counters use relaxed atomics.
- v1: one score program per column block walking all rows, 4-bit radix passes and a count
  pass, an unpadded ``dy_c``, ``db`` by a separate ``dy.sum(0)``.
"""

import torch
import triton
import triton.language as tl

from ._checks import check_dtypes
from ._tiles import mark_zero_padded, padded_columns
from ._tuning import TunedKernel, kernel_version, pow2_bucket

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
def _select_row(
    src_ptr,
    n,
    stride,
    k,
    idx_out_ptr,
    val_out_ptr,
    hits_ptr,
    hit_increment,
    STORE_VALUES: tl.constexpr,
    COUNT_HITS: tl.constexpr,
    ATOMIC_HITS: tl.constexpr,
    BLOCK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
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
    _compact_row(
        src_ptr,
        0,
        n,
        stride,
        threshold,
        k - above,
        idx_out_ptr,
        val_out_ptr,
        hits_ptr,
        hit_increment,
        STORE_VALUES,
        COUNT_HITS,
        ATOMIC_HITS,
        False,
        4,
        BLOCK,
    )


@triton.jit
def _compact_row(
    src_ptr,
    first,
    n,
    stride,
    threshold,
    ties_wanted,
    idx_out_ptr,
    val_out_ptr,
    hits_ptr,
    hit_increment,
    STORE_VALUES: tl.constexpr,
    COUNT_HITS: tl.constexpr,
    ATOMIC_HITS: tl.constexpr,
    RELAXED: tl.constexpr,
    PASSES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Writes the positions ``first <= i < n`` with key > threshold and the first ``ties_wanted``
    with key == threshold, ascending (one ordered pass). Keys are compared on their top
    8 * PASSES bits."""
    n_selected = 0
    n_ties = 0
    for start in range(first, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        raw, key = _load_keys(src_ptr, offs, n, stride)
        if PASSES < 4:
            key = key & -(1 << (32 - 8 * PASSES))  # NaN's all-ones low bits off, as in the search
        is_tie = (key == threshold).to(tl.int32)
        tie_rank = n_ties + tl.cumsum(is_tie, axis=0)
        selected = (key > threshold) | ((is_tie == 1) & (tie_rank <= ties_wanted))
        chosen = selected.to(tl.int32)
        slot = n_selected + tl.cumsum(chosen, axis=0) - 1
        tl.store(idx_out_ptr + slot, offs, mask=selected)
        if STORE_VALUES:
            tl.store(val_out_ptr + slot, raw, mask=selected)
        if COUNT_HITS:
            increments = tl.full([BLOCK], 1, tl.int64) * hit_increment
            if ATOMIC_HITS:
                if RELAXED:
                    tl.atomic_add(hits_ptr + offs, increments, mask=selected, sem="relaxed")
                else:
                    tl.atomic_add(hits_ptr + offs, increments, mask=selected)
            else:
                old = tl.load(hits_ptr + offs, mask=selected, other=0)
                tl.store(hits_ptr + offs, old + increments, mask=selected)
        n_selected += tl.sum(chosen, axis=0)
        n_ties += tl.sum(is_tie, axis=0)


@triton.jit
def _search_histogram(src_ptr, n, stride, k, PASSES: tl.constexpr, BLOCK: tl.constexpr):
    """The k-th largest key of one row, 8 bits per pass (``tl.histogram`` of the next digit of
    the keys that share the bits found so far); also the count of keys above it. ``PASSES``
    below 4 leaves the low bits zero: right for keys whose low bits are zero (16-bit inputs)."""
    bins = tl.arange(0, 256)
    threshold = 0
    above = 0
    for pass_ in tl.static_range(PASSES):
        shift = 24 - 8 * pass_
        hist = tl.zeros([256], dtype=tl.int32)
        outside = 0
        for start in range(0, n, BLOCK):
            _, key = _load_keys(src_ptr, start + tl.arange(0, BLOCK), n, stride)
            if pass_ == 0:
                match = key >= 0
            else:
                match = (key >> (shift + 8)) == (threshold >> (shift + 8))
            # Keys off the prefix (and past the row, key -1) land in bin 0 and are taken out.
            hist += tl.histogram(tl.where(match, (key >> shift) & 0xFF, 0), 256)
            outside += BLOCK - tl.sum(match.to(tl.int32), axis=0)
        hist -= tl.where(bins == 0, outside, 0)
        digit, above = _choose_digit(hist, above, k)
        threshold = threshold | (digit << shift)
    return threshold, above


@triton.jit
def _choose_digit(hist, above, k):
    """The largest digit whose bin and the bins above it hold at least k keys with the ``above``
    keys already above the prefix; and the new count of keys above the prefix extended by it."""
    bins = tl.arange(0, 256)
    at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with digit >= bin
    digit = tl.max(tl.where(above + at_least >= k, bins, 0), axis=0)
    return digit, above + tl.sum(tl.where(bins > digit, hist, 0), axis=0)


@triton.jit
def _column_scores_kernel(
    dy_ptr, scores_ptr, B, N, stride_b, stride_n, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr
):
    """scores[n] = sum_b |dy[b, n]|, accumulated in float32."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < B) & col_mask[None, :]
        ptrs = (
            dy_ptr + rows[:, None].to(tl.int64) * stride_b + cols[None, :].to(tl.int64) * stride_n
        )
        acc += tl.abs(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32))
    tl.store(scores_ptr + cols, tl.sum(acc, axis=0), mask=col_mask)


@triton.jit
def _unified_select_kernel(
    scores_ptr,
    idx_ptr,
    hits_ptr,
    N,
    k,
    hit_increment,
    COUNT_HITS: tl.constexpr,
    BLOCK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    _select_row(
        scores_ptr,
        N,
        1,
        k,
        idx_ptr,
        idx_ptr,
        hits_ptr,
        hit_increment,
        False,
        COUNT_HITS,
        False,
        BLOCK,
        RADIX_BITS,
    )


@triton.jit
def _gather_columns_kernel(
    dy_ptr, idx_ptr, out_ptr, B, K, stride_b, stride_n, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr
):
    """out[b, j] = dy[b, idx[j]], out contiguous B x K."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot_mask = slots < K
    cols = tl.load(idx_ptr + slots, mask=slot_mask, other=0)
    mask = (rows[:, None] < B) & slot_mask[None, :]
    vals = tl.load(
        dy_ptr + rows[:, None].to(tl.int64) * stride_b + cols[None, :].to(tl.int64) * stride_n,
        mask=mask,
    )
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + slots[None, :], vals, mask=mask)


@triton.jit
def _per_example_select_kernel(
    dy_ptr,
    val_ptr,
    idx_ptr,
    hits_ptr,
    N,
    k,
    stride_b,
    stride_n,
    COUNT_HITS: tl.constexpr,
    BLOCK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _select_row(
        dy_ptr + row * stride_b,
        N,
        stride_n,
        k,
        idx_ptr + row * k,
        val_ptr + row * k,
        hits_ptr,
        1,
        True,
        COUNT_HITS,
        True,
        BLOCK,
        RADIX_BITS,
    )


@triton.jit
def _scores_bias_partial_kernel(
    dy_ptr,
    part_ptr,
    B,
    N,
    stride_b,
    stride_n,
    ROWS_PER_CHUNK,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Chunk c of rows: part[0, c, n] = sum |dy[b, n]| and part[1, c, n] = sum dy[b, n]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1)
    col_mask = cols < N
    first = chunk * ROWS_PER_CHUNK
    last = tl.minimum(first + ROWS_PER_CHUNK, B)
    abs_acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    sum_acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for start in range(first, last, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < last) & col_mask[None, :]
        ptrs = (
            dy_ptr + rows[:, None].to(tl.int64) * stride_b + cols[None, :].to(tl.int64) * stride_n
        )
        values = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        abs_acc += tl.abs(values)
        sum_acc += values
    chunks = tl.num_programs(1)
    tl.store(part_ptr + chunk * N + cols, tl.sum(abs_acc, axis=0), mask=col_mask)
    tl.store(part_ptr + (chunks + chunk) * N + cols, tl.sum(sum_acc, axis=0), mask=col_mask)


@triton.jit
def _scores_bias_finish_kernel(part_ptr, scores_ptr, db_ptr, N, CHUNKS, BLOCK: tl.constexpr):
    """scores[n] and db[n]: the chunks' partial sums added in chunk order."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    scores = tl.zeros([BLOCK], dtype=tl.float32)
    bias = tl.zeros([BLOCK], dtype=tl.float32)
    for chunk in range(0, CHUNKS):
        scores += tl.load(part_ptr + chunk * N + cols, mask=mask, other=0.0)
        bias += tl.load(part_ptr + (CHUNKS + chunk) * N + cols, mask=mask, other=0.0)
    tl.store(scores_ptr + cols, scores, mask=mask)
    tl.store(db_ptr + cols, bias.to(db_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unified_top_kernel(
    scores_ptr,
    idx_ptr,
    hits_ptr,
    N,
    k,
    hit_increment,
    COUNT_HITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    threshold, above = _search_histogram(scores_ptr, N, 1, k, 4, BLOCK)
    _compact_row(
        scores_ptr,
        0,
        N,
        1,
        threshold,
        k - above,
        idx_ptr,
        idx_ptr,
        hits_ptr,
        hit_increment,
        False,
        COUNT_HITS,
        False,
        False,
        4,
        BLOCK,
    )


@triton.jit
def _gather_padded_kernel(
    dy_ptr,
    idx_ptr,
    out_ptr,
    B,
    K,
    K_PAD,
    stride_b,
    stride_n,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[b, j] = dy[b, idx[j]] for j < K and 0 for K <= j < K_PAD (out contiguous B x K_PAD)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid = slots < K
    cols = tl.load(idx_ptr + slots, mask=valid, other=0)
    row_mask = rows[:, None] < B
    vals = tl.load(
        dy_ptr + rows[:, None].to(tl.int64) * stride_b + cols[None, :].to(tl.int64) * stride_n,
        mask=row_mask & valid[None, :],
        other=0.0,
    )
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * K_PAD + slots[None, :],
        vals,
        mask=row_mask & (slots[None, :] < K_PAD),
    )


@triton.jit
def _per_example_top_kernel(
    dy_ptr,
    val_ptr,
    idx_ptr,
    hits_ptr,
    N,
    k,
    stride_b,
    stride_n,
    COUNT_HITS: tl.constexpr,
    PASSES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    src = dy_ptr + row * stride_b
    threshold, above = _search_histogram(src, N, stride_n, k, PASSES, BLOCK)
    _compact_row(
        src,
        0,
        N,
        stride_n,
        threshold,
        k - above,
        idx_ptr + row * k,
        val_ptr + row * k,
        hits_ptr,
        1,
        True,
        COUNT_HITS,
        True,
        True,
        PASSES,
        BLOCK,
    )


@triton.jit
def _slice_histogram_kernel(
    scores_ptr, state_ptr, part_ptr, N, SLICE, PASS: tl.constexpr, BLOCK: tl.constexpr
):
    """Wide unified search, pass PASS, program p: the histogram of digit PASS (8 bits, from the
    top) of the keys of ``scores[p * SLICE:(p + 1) * SLICE]`` that share the digits chosen so far
    (``state[PASS]``), written to ``part[PASS, p, :]``."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    bins = tl.arange(0, 256)
    shift = 24 - 8 * PASS
    first = pid * SLICE
    last = tl.minimum(first + SLICE, N)
    prefix = 0
    if PASS > 0:
        prefix = tl.load(state_ptr + 2 * PASS)
        # A slice without keys on the prefix (its bin of the last pass is empty) reads nothing.
        on_prefix = tl.load(
            part_ptr + ((PASS - 1) * programs + pid) * 256 + ((prefix >> (shift + 8)) & 0xFF)
        )
        last = tl.where(on_prefix > 0, last, first)
    hist = tl.zeros([256], dtype=tl.int32)
    outside = 0
    for start in range(first, last, BLOCK):
        _, key = _load_keys(scores_ptr, start + tl.arange(0, BLOCK), last, 1)
        if PASS == 0:
            match = key >= 0
        else:
            match = (key >> (shift + 8)) == (prefix >> (shift + 8))
        # Keys off the prefix (and past the slice, key -1) land in bin 0 and are taken out.
        hist += tl.histogram(tl.where(match, (key >> shift) & 0xFF, 0), 256)
        outside += BLOCK - tl.sum(match.to(tl.int32), axis=0)
    hist -= tl.where(bins == 0, outside, 0)
    tl.store(part_ptr + (PASS * programs + pid) * 256 + bins, hist)


@triton.jit
def _slice_rows(part_ptr, PASS: tl.constexpr, programs, slices):
    """``part[PASS, slices, :]``, zero for slices past the last."""
    bins = tl.arange(0, 256)
    return tl.load(
        part_ptr + (PASS * programs + slices[:, None]) * 256 + bins[None, :],
        mask=slices[:, None] < programs,
        other=0,
    )


@triton.jit
def _slice_digit_kernel(
    part_ptr, state_ptr, slices_ptr, k, PROGRAMS, PASS: tl.constexpr, ROWS: tl.constexpr
):
    """Wide unified search, after pass PASS (one program): adds the slices' histograms (integer
    sums: the same in any order), chooses the digit and writes the threshold so far and the count
    of keys above it to ``state[PASS + 1]``. After the last pass, also each slice's output offset,
    share of the ties at the threshold (the lowest slices first) and count of selected positions
    to ``slices[p]``."""
    bins = tl.arange(0, 256)
    rows = tl.arange(0, ROWS)
    threshold = 0
    above = 0
    if PASS > 0:
        threshold = tl.load(state_ptr + 2 * PASS)
        above = tl.load(state_ptr + 2 * PASS + 1)
    hist = tl.zeros([256], dtype=tl.int32)
    for start in range(0, PROGRAMS, ROWS):
        hist += tl.sum(_slice_rows(part_ptr, PASS, PROGRAMS, start + rows), axis=0)
    digit, above = _choose_digit(hist, above, k)
    threshold = threshold | (digit << (24 - 8 * PASS))
    tl.store(state_ptr + 2 * PASS + 2, threshold)
    tl.store(state_ptr + 2 * PASS + 3, above)
    if PASS == 3:
        ties_wanted = k - above
        ties_before = 0
        selected_before = 0
        for start in range(0, PROGRAMS, ROWS):
            slices = start + rows
            # Keys above the threshold: above its digit in the first pass where they differ.
            mine_above = tl.zeros([ROWS], dtype=tl.int32)
            for p in tl.static_range(4):
                chosen = (threshold >> (24 - 8 * p)) & 0xFF
                counts = _slice_rows(part_ptr, p, PROGRAMS, slices)
                mine_above += tl.sum(tl.where(bins[None, :] > chosen, counts, 0), axis=1)
            counts = _slice_rows(part_ptr, 3, PROGRAMS, slices)
            ties = tl.sum(tl.where(bins[None, :] == digit, counts, 0), axis=1)
            ties_ahead = ties_before + tl.cumsum(ties, axis=0) - ties
            taken = tl.minimum(tl.maximum(ties_wanted - ties_ahead, 0), ties)
            selected = mine_above + taken
            offset = selected_before + tl.cumsum(selected, axis=0) - selected
            valid = slices < PROGRAMS
            tl.store(slices_ptr + 3 * slices, offset, mask=valid)
            tl.store(slices_ptr + 3 * slices + 1, taken, mask=valid)
            tl.store(slices_ptr + 3 * slices + 2, selected, mask=valid)
            ties_before += tl.sum(ties, axis=0)
            selected_before += tl.sum(selected, axis=0)


@triton.jit
def _slice_compact_kernel(
    scores_ptr,
    state_ptr,
    slices_ptr,
    idx_ptr,
    hits_ptr,
    N,
    SLICE,
    hit_increment,
    COUNT_HITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Wide unified search, last step, program p: the selected positions of slice p, ascending,
    written from the slice's output offset on."""
    pid = tl.program_id(0)
    threshold = tl.load(state_ptr + 8)
    offset = tl.load(slices_ptr + 3 * pid)
    ties = tl.load(slices_ptr + 3 * pid + 1)
    selected = tl.load(slices_ptr + 3 * pid + 2)
    first = pid * SLICE
    last = tl.where(selected > 0, tl.minimum(first + SLICE, N), first)
    _compact_row(
        scores_ptr,
        first,
        last,
        1,
        threshold,
        ties,
        idx_ptr + offset,
        idx_ptr,
        hits_ptr,
        hit_increment,
        False,
        COUNT_HITS,
        False,
        False,
        4,
        BLOCK,
    )


def _prefer_block_near_width(configs, named_args):
    """Blocks no wider than the row (rounded up to a power of two), the widest first."""
    width = pow2_bucket(named_args["N"])
    fitting = [c for c in configs if c.kwargs["BLOCK"] <= max(width, 128)]
    return sorted(fitting, key=lambda c: -c.kwargs["BLOCK"])


def _select_configs():
    return [
        triton.Config({"BLOCK": block, "RADIX_BITS": RADIX_BITS}, num_warps=warps)
        for block in (128, 512, 2048, 4096)
        for warps in (4, 8)
        if block >= 32 * warps
    ]


def _prune_scores(configs, named_args):
    # Few rows: a tall block would only load masked-out rows.
    rows = pow2_bucket(named_args["B"])
    fitting = [c for c in configs if c.kwargs["BLOCK_B"] <= max(rows, 8)]
    return fitting or configs[:1]


column_scores = TunedKernel(
    _column_scores_kernel,
    [
        triton.Config({"BLOCK_B": bb, "BLOCK_N": bn}, num_warps=w)
        for bb, bn, w in (
            (32, 64, 4),
            (8, 64, 4),
            (64, 32, 4),
            (16, 128, 4),
            (32, 128, 8),
            (64, 64, 8),
        )
    ],
    key=["N"],
    prune=_prune_scores,
)
unified_select_row = TunedKernel(
    _unified_select_kernel,
    _select_configs(),
    key=["N"],
    prune=_prefer_block_near_width,
    in_place=["hits_ptr"],
)
gather_columns = TunedKernel(
    _gather_columns_kernel,
    [
        triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_warps=w)
        for bb, bk, w in ((32, 32, 4), (64, 16, 4), (16, 64, 4), (64, 64, 8))
    ],
    key=["K"],
)
per_example_select_rows = TunedKernel(
    _per_example_select_kernel,
    _select_configs(),
    key=["N"],
    prune=_prefer_block_near_width,
    in_place=["hits_ptr"],
)


def _prune_partial_scores(configs, named_args):
    # Chunks are whole multiples of every BLOCK_B; few rows: no tall blocks of masked-out rows.
    rows = pow2_bucket(named_args["B"])
    fitting = [c for c in configs if c.kwargs["BLOCK_B"] <= max(rows, 8)]
    return fitting or configs[-1:]


def _block_configs(largest):
    return [
        triton.Config({"BLOCK": block}, num_warps=warps)
        for block, warps in ((1024, 4), (2048, 8), (4096, 8), (512, 4), (256, 2))
        if block <= largest
    ]


def _prefer_largest_block_within(width_arg):
    """A pruner: the configs whose BLOCK fits the launch's ``width_arg`` scores, largest first."""

    def prune(configs, named_args):
        width = pow2_bucket(named_args[width_arg])
        fitting = [c for c in configs if c.kwargs["BLOCK"] <= max(width, 256)]
        return sorted(fitting, key=lambda c: -c.kwargs["BLOCK"]) or configs[-1:]

    return prune


_prefer_histogram_block = _prefer_largest_block_within("N")
_prefer_slice_block = _prefer_largest_block_within("SLICE")


scores_bias_partial = TunedKernel(
    _scores_bias_partial_kernel,
    [
        triton.Config({"BLOCK_B": bb, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bb, bn, w, s in (
            (16, 128, 4, 3),
            (32, 64, 4, 3),
            (8, 256, 4, 3),
            (16, 256, 8, 2),
            (32, 128, 8, 2),
        )
    ],
    key=["N", "ROWS_PER_CHUNK"],
    prune=_prune_partial_scores,
)
scores_bias_finish = TunedKernel(
    _scores_bias_finish_kernel, [triton.Config({"BLOCK": 1024}, num_warps=4)], key=["N"]
)
unified_top = TunedKernel(
    _unified_top_kernel,
    _block_configs(4096),
    key=["N"],
    prune=_prefer_histogram_block,
    in_place=["hits_ptr"],
)
slice_histogram = TunedKernel(
    _slice_histogram_kernel, _block_configs(2048), key=["SLICE"], prune=_prefer_slice_block
)
slice_digit = TunedKernel(
    _slice_digit_kernel, [triton.Config({"ROWS": 8}, num_warps=4)], key=["PROGRAMS"]
)
slice_compact = TunedKernel(
    _slice_compact_kernel,
    _block_configs(2048),
    key=["SLICE"],
    prune=_prefer_slice_block,
    in_place=["hits_ptr"],
)
gather_padded = TunedKernel(
    _gather_padded_kernel,
    [
        triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_warps=w)
        for bb, bk, w in ((32, 64, 4), (16, 128, 4), (64, 64, 8), (8, 256, 4))
    ],
    key=["K_PAD"],
)
per_example_top = TunedKernel(
    _per_example_top_kernel,
    _block_configs(4096),
    key=["N"],
    prune=_prefer_histogram_block,
    in_place=["hits_ptr"],
)

# Rows per chunk of the score pass: enough chunks to fill a large GPU (with 64 to 256 column
# blocks at N = 8192, 16 chunks give 1024 to 4096 programs), each chunk a multiple of 64 rows.
SCORE_CHUNKS = 16
# Bits of the selection key that can be non-zero per input dtype (|x| converted to float32).
_KEY_PASSES = {torch.float32: 4, torch.float16: 3, torch.bfloat16: 2}


# From this row width on, the unified search splits each pass over programs that each take a
# slice of the scores (one program walking all the scores per pass is latency-bound there).
SPLIT_MIN_COLUMNS = 32768
# Scores per program of the split search (a multiple of 16: slices start aligned) and the most
# programs (one program adds their histograms after each pass); wider rows get wider slices.
SPLIT_SLICE = 2048
SPLIT_MAX_PROGRAMS = 256


def _split_slice(N: int) -> int:
    return triton.cdiv(max(triton.cdiv(N, SPLIT_MAX_PROGRAMS), 1), SPLIT_SLICE) * SPLIT_SLICE


def _top_columns_split(scores, k, idx, hits, hit_increment, count_hits):
    """``unified_top`` over slices of the scores: 4 passes of a histogram per slice and a one-
    program digit step each, then the compaction per slice; no value is read on the host."""
    N = scores.shape[0]
    slice_ = _split_slice(N)
    programs = triton.cdiv(N, slice_)
    part = torch.empty((4, programs, 256), dtype=torch.int32, device=scores.device)
    state = torch.empty(10, dtype=torch.int32, device=scores.device)  # (threshold, above) x pass
    slices = torch.empty((programs, 3), dtype=torch.int32, device=scores.device)
    for pass_ in range(4):
        slice_histogram[(programs,)](scores, state, part, N, slice_, PASS=pass_)
        slice_digit[(1,)](part, state, slices, k, programs, PASS=pass_)
    slice_compact[(programs,)](
        scores, state, slices, idx, hits, N, slice_, hit_increment, COUNT_HITS=count_hits
    )


def _no_hits(device):
    return torch.empty(1, dtype=torch.int64, device=device)


def _unified_select_v1(dy, k, hits):
    B, N = dy.shape
    scores = torch.empty(N, dtype=torch.float32, device=dy.device)
    column_scores[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
        dy, scores, B, N, dy.stride(0), dy.stride(1)
    )
    idx = torch.empty(k, dtype=torch.int64, device=dy.device)
    count = hits is not None
    unified_select_row[(1,)](
        scores, idx, hits if count else _no_hits(dy.device), N, k, B, COUNT_HITS=count
    )
    dy_c = torch.empty((B, k), dtype=dy.dtype, device=dy.device)
    if B > 0:
        gather_columns[
            lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(k, meta["BLOCK_K"]))
        ](dy, idx, dy_c, B, k, dy.stride(0), dy.stride(1))
    return idx, dy_c, dy.sum(0)


def _unified_select_v2(dy, k, hits):
    B, N = dy.shape
    rows_per_chunk = max(64, padded_columns(triton.cdiv(B, SCORE_CHUNKS)))
    chunks = max(1, triton.cdiv(B, rows_per_chunk))
    part = torch.empty((2, chunks, N), dtype=torch.float32, device=dy.device)
    scores_bias_partial[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), chunks)](
        dy, part, B, N, dy.stride(0), dy.stride(1), rows_per_chunk
    )
    scores = torch.empty(N, dtype=torch.float32, device=dy.device)
    db = torch.empty(N, dtype=dy.dtype, device=dy.device)
    scores_bias_finish[lambda meta: (triton.cdiv(N, meta["BLOCK"]),)](part, scores, db, N, chunks)
    idx = torch.empty(k, dtype=torch.int64, device=dy.device)
    count = hits is not None
    hits_arg = hits if count else _no_hits(dy.device)
    if N >= SPLIT_MIN_COLUMNS:
        _top_columns_split(scores, k, idx, hits_arg, B, count)
    else:
        unified_top[(1,)](scores, idx, hits_arg, N, k, B, COUNT_HITS=count)
    k_pad = padded_columns(k)
    padded = torch.empty((B, k_pad), dtype=dy.dtype, device=dy.device)
    if B > 0:
        gather_padded[
            lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), triton.cdiv(k_pad, meta["BLOCK_K"]))
        ](dy, idx, padded, B, k, k_pad, dy.stride(0), dy.stride(1))
    mark_zero_padded(padded)
    return idx, padded[:, :k], db


def unified_select_and_bias(dy: torch.Tensor, k: int, hits: torch.Tensor | None = None):
    """``unified_select`` plus the bias gradient ``db = dy.sum(0)`` (dtype of ``dy``), which the
    v2 kernels take from the same pass over ``dy`` as the column scores."""
    check_dtypes("unified_select_and_bias", dy=dy)
    if kernel_version() == "v1":
        return _unified_select_v1(dy, k, hits)
    return _unified_select_v2(dy, k, hits)


def unified_select(dy: torch.Tensor, k: int, hits: torch.Tensor | None = None):
    """Batch-shared top-k columns of ``dy`` (B x N) by ``sum_b |dy[b, n]|``.

    Returns ``(idx, dy_c)``: int64 column indices sorted ascending (k) and ``dy[:, idx]`` (B x k;
    with the v2 kernels the ``[:, :k]`` view of a zero-padded B x roundup(k, 64) buffer, so rows
    are 16-byte aligned). ``hits`` (int64, N), if given, gets B added at every selected column.
    """
    check_dtypes("unified_select", dy=dy)
    return unified_select_and_bias(dy, k, hits)[:2]


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
        hits_arg = hits if count else _no_hits(dy.device)
        if kernel_version() == "v1":
            per_example_select_rows[(B,)](
                dy, values, idx, hits_arg, N, k, dy.stride(0), dy.stride(1), COUNT_HITS=count
            )
        else:
            per_example_top[(B,)](
                dy,
                values,
                idx,
                hits_arg,
                N,
                k,
                dy.stride(0),
                dy.stride(1),
                COUNT_HITS=count,
                PASSES=_KEY_PASSES.get(dy.dtype, 4),
            )
    return values, idx
