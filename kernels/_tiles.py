"""Tile scheduling shared by the matrix-product kernels."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 GROUP: tl.constexpr):
    """(row block, column block) of program ``pid``; GROUP row blocks share column blocks in
    consecutive programs, so their operand tiles are reused from L2."""
    blocks_rows = tl.cdiv(rows, BLOCK_ROWS)
    blocks_cols = tl.cdiv(cols, BLOCK_COLS)
    group_size = GROUP * blocks_cols
    first = (pid // group_size) * GROUP
    rows_in_group = min(blocks_rows - first, GROUP)
    return first + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group
