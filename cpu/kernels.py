"""Numba kernels of the CPU backend: small functions over plain arrays and scalars.

Layout facts come from ferrum.format as tables passed in (``rows``/``cols`` [128, 8]: the k row
and column inside a 16x64 chunk of nibble s of word w), so no index rule is restated here.
Words are read as uint32 so that shifts are logical.
"""

import numpy as np
from numba import njit, prange

_opts = dict(cache=True, nogil=True)


@njit(parallel=True, **_opts)
def repack(qweight, perm, rows, cols, out):
    """GPTQ uint32 [K/8, N] -> Marlin uint32 [K/16, 2N]; Marlin row k is GPTQ row perm[k]."""
    k_tiles, width = out.shape
    chunks = width // 128
    for kt in prange(k_tiles):
        for c in range(chunks):
            for w in range(128):
                word = np.uint32(0)
                for s in range(8):
                    src = perm[kt * 16 + rows[w, s]]
                    n = c * 64 + cols[w, s]
                    nib = (qweight[src >> 3, n] >> np.uint32(4 * (src & 7))) & np.uint32(15)
                    word |= nib << np.uint32(4 * s)
                out[kt, c * 128 + w] = word


@njit(parallel=True, **_opts)
def dequantize(marlin, scales, scale_inv, group_rows, kt_begin, kt_end, out):
    """Marlin k-tiles [kt_begin, kt_end) -> float32 out [16*(kt_end-kt_begin), N], Marlin row order.

    scales are the permuted [groups, N] (float32 here); scale_inv[n] is where column n's scale
    sits. A word of chunk row kt holds rows {r0, r0+1, r0+8, r0+9} x columns {c, c+8} of n-tile j
    (see ferrum.format), in the nibble order (r0,c) (r0+8,c) (r0,c+8) (r0+8,c+8), then one row down.
    """
    chunks = marlin.shape[1] // 128
    for kt in prange(kt_begin, kt_end):
        g = (kt * 16) // group_rows
        base = (kt - kt_begin) * 16
        srow = np.empty(64, dtype=np.float32)
        for c in range(chunks):
            for j in range(64):
                srow[j] = scales[g, scale_inv[c * 64 + j]]
            for w in range(128):
                word = marlin[kt, c * 128 + w]
                t = w >> 2
                r = base + 2 * (t & 3)
                col = (t >> 2) + 16 * (w & 3)
                n = c * 64 + col
                s0 = srow[col]
                s8 = srow[col + 8]
                out[r, n] = (np.float32(word & np.uint32(15)) - np.float32(8.0)) * s0
                out[r + 8, n] = (np.float32((word >> np.uint32(4)) & np.uint32(15)) - np.float32(8.0)) * s0
                out[r, n + 8] = (np.float32((word >> np.uint32(8)) & np.uint32(15)) - np.float32(8.0)) * s8
                out[r + 8, n + 8] = (np.float32((word >> np.uint32(12)) & np.uint32(15)) - np.float32(8.0)) * s8
                out[r + 1, n] = (np.float32((word >> np.uint32(16)) & np.uint32(15)) - np.float32(8.0)) * s0
                out[r + 9, n] = (np.float32((word >> np.uint32(20)) & np.uint32(15)) - np.float32(8.0)) * s0
                out[r + 1, n + 8] = (np.float32((word >> np.uint32(24)) & np.uint32(15)) - np.float32(8.0)) * s8
                out[r + 9, n + 8] = (np.float32(word >> np.uint32(28)) - np.float32(8.0)) * s8


@njit(parallel=True, fastmath=True, **_opts)
def mm_fused(a, marlin, scales, scale_inv, group_rows, out, col0):
    """out[:, col0:col0+N] = a @ W for small M, reading the packed tiles directly.

    a float32 [M, K] (already in Marlin row order); out float32 [M, >= col0 + N].
    One task per 64-column chunk. Word w = 4t + j of a chunk row feeds rows {r, r+1, r+8, r+9}
    (r = 2*(t % 4)) and columns {c, c+8} (c = t // 4) of n-tile j, so each word is decoded once
    and used for every row of a. Words are visited with t % 4 outermost so that consecutive
    updates go to different columns (no store-to-load chain). The uint4b8 offset is taken out
    per group through the sum of a's rows: sum a*(q-8)*s = s*(sum a*q - 8*sum a).
    """
    M, K = a.shape
    chunks = marlin.shape[1] // 128
    k_tiles = K // 16
    tiles_per_group = group_rows // 16
    for c in prange(chunks):
        acc = np.zeros((M, 64), dtype=np.float32)
        part = np.zeros((M, 64), dtype=np.float32)
        for kt in range(k_tiles):
            k0 = kt * 16
            row = marlin[kt, c * 128:(c + 1) * 128]
            for v in range(4):
                r = k0 + 2 * v
                for c4 in range(8):
                    for j in range(4):
                        word = row[16 * c4 + 4 * v + j]
                        col = c4 + 16 * j
                        q0 = np.float32(word & np.uint32(15))
                        q1 = np.float32((word >> np.uint32(4)) & np.uint32(15))
                        q2 = np.float32((word >> np.uint32(8)) & np.uint32(15))
                        q3 = np.float32((word >> np.uint32(12)) & np.uint32(15))
                        q4 = np.float32((word >> np.uint32(16)) & np.uint32(15))
                        q5 = np.float32((word >> np.uint32(20)) & np.uint32(15))
                        q6 = np.float32((word >> np.uint32(24)) & np.uint32(15))
                        q7 = np.float32(word >> np.uint32(28))
                        for m in range(M):
                            a0 = a[m, r]
                            a1 = a[m, r + 1]
                            a8 = a[m, r + 8]
                            a9 = a[m, r + 9]
                            part[m, col] += a0 * q0 + a8 * q1 + a1 * q4 + a9 * q5
                            part[m, col + 8] += a0 * q2 + a8 * q3 + a1 * q6 + a9 * q7
            if (kt + 1) % tiles_per_group == 0:
                g = (kt * 16) // group_rows
                k_first = (kt + 1 - tiles_per_group) * 16
                for m in range(M):
                    offset = np.float32(0.0)
                    for k in range(k_first, k0 + 16):
                        offset += a[m, k]
                    offset *= np.float32(8.0)
                    for jj in range(64):
                        s = scales[g, scale_inv[c * 64 + jj]]
                        acc[m, jj] += (part[m, jj] - offset) * s
                        part[m, jj] = 0.0
        for m in range(M):
            for jj in range(64):
                out[m, col0 + c * 64 + jj] = acc[m, jj]
