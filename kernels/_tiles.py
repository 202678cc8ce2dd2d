"""Tile scheduling shared by the matrix-product kernels."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(
    pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr
):
    """(row block, column block) of program ``pid``; GROUP row blocks share column blocks in
    consecutive programs, so their operand tiles are reused from L2."""
    blocks_rows = tl.cdiv(rows, BLOCK_ROWS)
    blocks_cols = tl.cdiv(cols, BLOCK_COLS)
    group_size = GROUP * blocks_cols
    first = (pid // group_size) * GROUP
    rows_in_group = min(blocks_rows - first, GROUP)
    return first + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


# Row length of the compacted gradient dy_c: padded with zero columns to a multiple of this, so
# its rows start 16-byte aligned and the products load whole tiles (exposed as a [:, :k] view).
PAD_COLUMNS = 64


def padded_columns(k: int) -> int:
    return -(-k // PAD_COLUMNS) * PAD_COLUMNS


def mark_zero_padded(base) -> None:
    """Marks ``base`` (B x k_pad) as zero in the columns past the view handed out."""
    base._mebp_zero_padded = True


def padded_width(view) -> int:
    """The row length that may be read from ``view`` (B x k): the zero-padded width when ``view``
    is the ``[:, :k]`` view of a marked base, else k."""
    base = view._base
    if (
        base is not None
        and getattr(base, "_mebp_zero_padded", False)
        and base.dim() == 2
        and view.data_ptr() == base.data_ptr()
        and view.stride() == base.stride()
        and base.stride(1) == 1
        and base.shape[0] == view.shape[0]
    ):
        return base.shape[1]
    return view.shape[1]
