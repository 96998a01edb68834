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
def dequantize(marlin, scales, scale_inv, group_rows, rows, cols, kt_begin, kt_end, out):
    """Marlin k-tiles [kt_begin, kt_end) -> float32 out [16*(kt_end-kt_begin), N], Marlin row order.

    scales are the permuted [groups, N] (float32 here); scale_inv[n] is where column n's scale sits.
    """
    chunks = marlin.shape[1] // 128
    for kt in prange(kt_begin, kt_end):
        g = (kt * 16) // group_rows
        base = (kt - kt_begin) * 16
        for c in range(chunks):
            for w in range(128):
                word = marlin[kt, c * 128 + w]
                for s in range(8):
                    n = c * 64 + cols[w, s]
                    q = np.float32((word >> np.uint32(4 * s)) & np.uint32(15)) - np.float32(8.0)
                    out[base + rows[w, s], n] = q * scales[g, scale_inv[n]]


@njit(parallel=True, fastmath=True, **_opts)
def mm_fused(a, marlin, scales, scale_inv, group_rows, out, col0):
    """out[:, col0:col0+N] = a @ W for small M, reading the packed tiles directly.

    a float32 [M, K] (already in Marlin row order); out float32 [M, >= col0 + N].
    One task per 64-column chunk: a word of chunk row kt feeds rows {r0, r0+1, r0+8, r0+9} of
    the k-tile and columns {c, c+8} of n-tile j, so each word is decoded once and used for
    every row of a. Partial sums are kept per scale group and scaled once per group.
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
            for w in range(128):
                word = marlin[kt, c * 128 + w]
                t = w >> 2
                r = k0 + 2 * (t & 3)
                col = (t >> 2) + 16 * (w & 3)
                # Nibble order of a word (see ferrum.format): (r, col), (r+8, col), (r, col+8),
                # (r+8, col+8), then the same one row down.
                q0 = np.float32(word & np.uint32(15)) - np.float32(8.0)
                q1 = np.float32((word >> np.uint32(4)) & np.uint32(15)) - np.float32(8.0)
                q2 = np.float32((word >> np.uint32(8)) & np.uint32(15)) - np.float32(8.0)
                q3 = np.float32((word >> np.uint32(12)) & np.uint32(15)) - np.float32(8.0)
                q4 = np.float32((word >> np.uint32(16)) & np.uint32(15)) - np.float32(8.0)
                q5 = np.float32((word >> np.uint32(20)) & np.uint32(15)) - np.float32(8.0)
                q6 = np.float32((word >> np.uint32(24)) & np.uint32(15)) - np.float32(8.0)
                q7 = np.float32(word >> np.uint32(28)) - np.float32(8.0)
                for m in range(M):
                    a0 = a[m, r]
                    a1 = a[m, r + 1]
                    a8 = a[m, r + 8]
                    a9 = a[m, r + 9]
                    part[m, col] += a0 * q0 + a8 * q1 + a1 * q4 + a9 * q5
                    part[m, col + 8] += a0 * q2 + a8 * q3 + a1 * q6 + a9 * q7
            if (kt + 1) % tiles_per_group == 0:
                g = (kt * 16) // group_rows
                for j in range(64):
                    s = scales[g, scale_inv[c * 64 + j]]
                    for m in range(M):
                        acc[m, j] += part[m, j] * s
                        part[m, j] = 0.0
        for m in range(M):
            for j in range(64):
                out[m, col0 + c * 64 + j] = acc[m, j]
