#!/usr/bin/env python3
"""Bytes that strided's kernels move between the L2 and the SMs, counted
from the key ranges their blocks load (a model; no GPU needed):

    python3 bench/strided_traffic.py [L ...]      (default: 32768)

Strided (Child et al.) with stride = local = S runs as two components
(docs/passes/decompose.md): the residue classes (row i = c + S t attends
keys c + S u, u < t, a causal attention of L/S rows per class c) and the
band (row i attends keys i - S + 1 .. i). A block of R rows loads its
rows of q, ceil(span / 64) K/V tiles of 64 keys, where span is the key
range that some row of the block attends (ConvertToGpu's itemRange:
tiles start at the block's first key, not at a multiple of 64), and the
band's blocks, which merge, the stored state of their rows (O in 16 bits
plus max and sum); each block writes its rows (out, or the state).

For B = 1, H = 16, D = 128 at L = 32768 it prints, per component and
block shape, the bytes read by the SMs from the L2 and written back, and
compares the 128-row figures with ncu's L2 -> SM bytes of the rounds
(bench/gpu_ab.md, "Rounds of half a pair": residue 545 MB, band 813 MB).
The 64-row shape is the one-warpgroup experiment (gpu_ab.md, "One-warpgroup
blocks"), which ran at the same speed as the 128-row blocks."""
import math
import sys

H, D, S, KEY_TILE = 16, 128, 128, 64
ELEM = 2            # bytes of a bf16 element
ROW = D * ELEM      # bytes of one row of q, k, v or out
STATE_ROW = 8       # max and sum, f32 each
NCU_MB = {"residue": 545, "band": 813}


def tiles(first, last):
    """K/V tiles of 64 keys from key `first` up to (not including) `last`."""
    return max(0, math.ceil((last - first) / KEY_TILE))


def residue_blocks(L, rows):
    """(q rows, key tiles) per block of one class: t attends u in [0, t)."""
    per_class = math.ceil(L / S)
    for t0 in range(0, per_class, rows):
        t1 = min(t0 + rows, per_class)
        yield t1 - t0, tiles(0, t1 - 1)


def band_blocks(L, rows):
    """(q rows, key tiles) per block: row i attends [i - S + 1, i]."""
    for i0 in range(0, L, rows):
        i1 = min(i0 + rows, L)
        yield i1 - i0, tiles(max(0, i0 - S + 1), i1)


def traffic(L, rows):
    """MB read from the L2 and written to it, per component, all heads."""
    classes = S
    out = {}
    for name, blocks, copies, merges in (
            ("residue", residue_blocks(L, rows), classes, False),
            ("band", band_blocks(L, rows), 1, True)):
        read = written = 0
        for q_rows, kv_tiles in blocks:
            read += q_rows * ROW + kv_tiles * KEY_TILE * ROW * 2
            if merges:
                read += q_rows * (ROW + STATE_ROW)
            written += q_rows * (ROW + STATE_ROW)
        out[name] = (H * copies * read / 1e6, H * copies * written / 1e6)
    return out


def attended_pairs(L):
    """Pairs (i, j) of strided with stride = local = S, all heads."""
    return H * sum(min(i + 1, S) + i // S for i in range(L))


def main():
    lengths = [int(a) for a in sys.argv[1:]] or [32768]
    for L in lengths:
        flops = 4 * attended_pairs(L) * D
        print(f"L = {L}: {flops / 1e9:.1f} GFLOP effective "
              f"({flops / 250e12 * 1e6:.0f} us at 250 TF/s)")
        print(f"{'block rows':>10} {'component':>9} {'L2->SM MB':>10} "
              f"{'SM->L2 MB':>10} {'ncu L2->SM MB':>14}")
        for rows in (128, 64):
            total = 0.0
            for name, (read, written) in traffic(L, rows).items():
                total += read
                ncu = NCU_MB[name] if rows == 128 and L == 32768 else ""
                print(f"{rows:>10} {name:>9} {read:>10.0f} {written:>10.0f} "
                      f"{ncu:>14}")
            print(f"{rows:>10} {'both':>9} {total:>10.0f}")


if __name__ == "__main__":
    main()
