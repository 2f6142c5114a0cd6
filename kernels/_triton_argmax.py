"""The block argmax shared by the Triton kernels that pick one row per step (DQ bins, k-center).

Each step runs one program per block of rows that scores its rows and stores the block's best value and
the first row attaining it (:func:`store_block_argmax`), then a one-program kernel reduces the block
winners to the step's pick (:func:`reduce_block_winners`): the largest value, the lowest index on ties,
which is the same rule as NumPy's ``argmax`` over all rows.
"""

from __future__ import annotations

from ._runtime import triton_available

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def store_block_argmax(score, live, offs, n, pid, blk_val_ptr, blk_idx_ptr, BLOCK_N: tl.constexpr):
        """Store the block's max of ``score`` and the first live row attaining it (-1: no live row)."""
        best = tl.max(score, axis=0)
        cand = tl.where(live & (score == best), offs, n + BLOCK_N)
        idx = tl.min(cand, axis=0)
        idx = tl.where(idx < n, idx, -1)
        tl.store(blk_val_ptr + pid, best)
        tl.store(blk_idx_ptr + pid, idx)

    @triton.jit
    def reduce_block_winners(blk_val_ptr, blk_idx_ptr, n_blocks, BLOCK: tl.constexpr):
        """The pick over the block winners: the largest value, the lowest row index on ties."""
        offs = tl.arange(0, BLOCK)
        idx = tl.load(blk_idx_ptr + offs, mask=offs < n_blocks, other=-1)
        val = tl.load(blk_val_ptr + offs, mask=offs < n_blocks, other=-float("inf"))
        valid = idx >= 0
        val = tl.where(valid, val, -float("inf"))
        best = tl.max(val, axis=0)
        cand = tl.where(valid & (val == best), idx, 2147483647)
        return tl.min(cand, axis=0)
