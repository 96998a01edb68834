"""Numba kernels of the CPU backend: small functions over plain arrays and scalars.

Layout facts come from ferrum.format as tables passed in (``rows``/``cols`` [128, 8]: the k row
and column inside a 16x64 chunk of nibble s of word w), so no index rule is restated here.
Words are read as uint32 so that shifts are logical.
"""

import types

import numpy as np
from numba import njit, prange

#: name -> the same kernel compiled without threads, for calls too small to pay for waking
#: Numba's worker threads (~100 µs a parallel region on a 2-core VM: more than a whole small
#: call). Only for the kernels declared parallel.
SERIAL = {}


def _jit(fn, options):
    """njit with nogil, cached on disk where Numba finds a writable cache directory (beside this
    file, else the user's cache; NUMBA_CACHE_DIR overrides). Where there is none -- a read-only
    install run by a user without a writable home -- the kernels still compile, per process."""
    try:
        return njit(cache=True, nogil=True, **options)(fn)
    except RuntimeError as exc:     # "cannot cache function ...: no locator available"
        if "cannot cache" not in str(exc):
            raise
        return njit(nogil=True, **options)(fn)


def _kernel(**options):
    def decorate(fn):
        if options.get("parallel"):
            # A function of its own name: Numba's disk cache tells entries apart by the
            # function's qualified name and signature, not by the parallel flag.
            twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                      fn.__defaults__, fn.__closure__)
            twin.__qualname__ = fn.__qualname__ + "_serial"
            twin.__module__ = fn.__module__
            SERIAL[fn.__name__] = _jit(twin, {**options, "parallel": False})
        return _jit(fn, options)
    return decorate


@_kernel(parallel=True)
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


@_kernel(parallel=True)
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


#: Words per block of mm_fused's inner loops: 64 contiguous words, whose activation rows repeat
#: every 16 words (see below). Long enough that LLVM's vector loops and their runtime alias
#: checks pay off, short enough that the decoded block stays in L1.
BLOCK_WORDS = 64


@_kernel()
def _slice(sl, slice_chunks, chunks):
    """Slice sl of a fused kernel: its first and end chunk (64 columns each) and its words."""
    c_begin = sl * slice_chunks
    c_end = min(chunks, c_begin + slice_chunks)
    return c_begin, c_end, (c_end - c_begin) * 128


@_kernel()
def _close_group(acc0, acc8, result, group_scales, scale_inv, c_begin, c_end):
    """At a scale group's end: add the four words of each column (acc0: column c, acc8: c + 8;
    word i = 128 c' + 16 c4 + 4 v + j of the slice holds column c4 of n-tile j), scale the sums
    by the group's scales into result, and clear the accumulators for the next group."""
    base = c_begin * 64
    for m in range(acc0.shape[0]):
        for c in range(c_end - c_begin):
            for c4 in range(8):
                for j in range(4):
                    t0 = np.float32(0.0)
                    t8 = np.float32(0.0)
                    for v in range(4):
                        i = c * 128 + 16 * c4 + 4 * v + j
                        t0 += acc0[m, i]
                        t8 += acc8[m, i]
                        acc0[m, i] = 0.0
                        acc8[m, i] = 0.0
                    n = c * 64 + c4 + 16 * j
                    result[m, n] += t0 * group_scales[scale_inv[base + n]]
                    result[m, n + 8] += t8 * group_scales[scale_inv[base + n + 8]]


@_kernel(parallel=True, fastmath={"contract"})
def mm_fused(a, marlin, scales, scale_inv, group_rows, out, col0, slice_chunks):
    """out[:, col0:col0+N] = a @ W for small M, reading the packed tiles directly.

    a float32 [M, K] (already in Marlin row order); marlin int32 [K/16, 2N]; out float32
    [M, >= col0 + N]; each parallel task takes ``slice_chunks`` chunks (64 columns, 128 words).
    Word i of a chunk row (t = i // 4) holds rows {r, r+8, r+1, r+9} of the k-tile (r =
    2*(t % 4)) in nibbles (0, 1, 4, 5) for column c = t // 4 of n-tile i % 4, and nibbles
    (2, 3, 6, 7) for column c + 8 (see ferrum.format). So which rows of a a word needs depends
    on i % 16 only: per k-tile the four rows are laid out once as 64-lane patterns (``xs``), and
    a block of 64 words is decoded once into eight 64-lane rows of q - 8 (``q``, exact in
    float32) and multiplied into each row of a with plain vector loops. Each word's two column
    sums accumulate in place (acc0, acc8) over a scale group; at its end the four words of a
    column are added and the group's scale applied.
    """
    M, K = a.shape
    chunks = marlin.shape[1] // 128
    k_tiles = K // 16
    tiles_per_group = group_rows // 16
    n_slices = (chunks + slice_chunks - 1) // slice_chunks     # parallel tasks: column slices
    for sl in prange(n_slices):
        c_begin, c_end, n_words = _slice(sl, slice_chunks, chunks)
        acc0 = np.zeros((M, n_words), dtype=np.float32)
        acc8 = np.zeros((M, n_words), dtype=np.float32)
        result = np.zeros((M, n_words // 2), dtype=np.float32)
        xs = np.empty((M, 4, BLOCK_WORDS), dtype=np.float32)
        q = np.empty((8, BLOCK_WORDS), dtype=np.float32)
        eight = np.float32(8.0)
        for kt in range(k_tiles):
            k0 = kt * 16
            words = marlin[kt, c_begin * 128:c_end * 128]
            for m in range(M):
                for i in range(BLOCK_WORDS):
                    r = k0 + 2 * ((i >> 2) & 3)
                    xs[m, 0, i] = a[m, r]
                    xs[m, 1, i] = a[m, r + 8]
                    xs[m, 2, i] = a[m, r + 1]
                    xs[m, 3, i] = a[m, r + 9]
            for b in range(n_words // BLOCK_WORDS):     # (a stepped range vectorizes worse)
                i0 = b * BLOCK_WORDS
                # np.int32 keeps the nibbles 32-bit (Numba widens integer arithmetic to 64 bits,
                # and int64 -> float32 does not vectorize without AVX-512).
                for i in range(BLOCK_WORDS):
                    w = words[i0 + i]
                    q[0, i] = np.float32(np.int32(w & 15)) - eight
                    q[1, i] = np.float32(np.int32((w >> 4) & 15)) - eight
                    q[2, i] = np.float32(np.int32((w >> 16) & 15)) - eight
                    q[3, i] = np.float32(np.int32((w >> 20) & 15)) - eight
                    q[4, i] = np.float32(np.int32((w >> 8) & 15)) - eight
                    q[5, i] = np.float32(np.int32((w >> 12) & 15)) - eight
                    q[6, i] = np.float32(np.int32((w >> 24) & 15)) - eight
                    q[7, i] = np.float32(np.int32((w >> 28) & 15)) - eight
                for m in range(M):
                    x = xs[m]
                    s0 = acc0[m, i0:i0 + BLOCK_WORDS]
                    s8 = acc8[m, i0:i0 + BLOCK_WORDS]
                    for i in range(BLOCK_WORDS):
                        s0[i] += x[0, i] * q[0, i] + x[1, i] * q[1, i] + x[2, i] * q[2, i] + x[3, i] * q[3, i]
                        s8[i] += x[0, i] * q[4, i] + x[1, i] * q[5, i] + x[2, i] * q[6, i] + x[3, i] * q[7, i]
            if (kt + 1) % tiles_per_group == 0:
                _close_group(acc0, acc8, result, scales[k0 // group_rows], scale_inv, c_begin, c_end)
        for m in range(M):
            for n in range(n_words // 2):
                out[m, col0 + c_begin * 64 + n] = result[m, n]


@_kernel(parallel=True, fastmath={"contract"})
def mm_fused_row(a, marlin, scales, scale_inv, group_rows, out, col0, slice_chunks):
    """mm_fused for one row of a (M == 1, the decode step), in one loop per block: each word is
    decoded where it is multiplied, and two k-tiles go into the accumulators per pass (every
    scale group holds an even number of k-tiles), which halves their loads and stores."""
    K = a.shape[1]
    chunks = marlin.shape[1] // 128
    k_tiles = K // 16
    tiles_per_group = group_rows // 16
    n_slices = (chunks + slice_chunks - 1) // slice_chunks     # parallel tasks: column slices
    for sl in prange(n_slices):
        c_begin, c_end, n_words = _slice(sl, slice_chunks, chunks)
        acc0 = np.zeros((1, n_words), dtype=np.float32)
        acc8 = np.zeros((1, n_words), dtype=np.float32)
        result = np.zeros((1, n_words // 2), dtype=np.float32)
        xs = np.empty((8, BLOCK_WORDS), dtype=np.float32)    # rows 0-3: k-tile kt, 4-7: kt + 1
        eight = np.float32(8.0)
        for kt in range(0, k_tiles, 2):
            k0 = kt * 16
            for i in range(BLOCK_WORDS):
                r = k0 + 2 * ((i >> 2) & 3)
                for t in range(2):
                    xs[4 * t, i] = a[0, r + 16 * t]
                    xs[4 * t + 1, i] = a[0, r + 16 * t + 8]
                    xs[4 * t + 2, i] = a[0, r + 16 * t + 1]
                    xs[4 * t + 3, i] = a[0, r + 16 * t + 9]
            w_lo = marlin[kt, c_begin * 128:c_end * 128]
            w_hi = marlin[kt + 1, c_begin * 128:c_end * 128]
            for b in range(n_words // BLOCK_WORDS):
                i0 = b * BLOCK_WORDS
                s0 = acc0[0, i0:i0 + BLOCK_WORDS]
                s8 = acc8[0, i0:i0 + BLOCK_WORDS]
                for i in range(BLOCK_WORDS):
                    w = w_lo[i0 + i]
                    u = w_hi[i0 + i]
                    s0[i] += (xs[0, i] * (np.float32(np.int32(w & 15)) - eight)
                              + xs[1, i] * (np.float32(np.int32((w >> 4) & 15)) - eight)
                              + xs[2, i] * (np.float32(np.int32((w >> 16) & 15)) - eight)
                              + xs[3, i] * (np.float32(np.int32((w >> 20) & 15)) - eight)
                              + xs[4, i] * (np.float32(np.int32(u & 15)) - eight)
                              + xs[5, i] * (np.float32(np.int32((u >> 4) & 15)) - eight)
                              + xs[6, i] * (np.float32(np.int32((u >> 16) & 15)) - eight)
                              + xs[7, i] * (np.float32(np.int32((u >> 20) & 15)) - eight))
                    s8[i] += (xs[0, i] * (np.float32(np.int32((w >> 8) & 15)) - eight)
                              + xs[1, i] * (np.float32(np.int32((w >> 12) & 15)) - eight)
                              + xs[2, i] * (np.float32(np.int32((w >> 24) & 15)) - eight)
                              + xs[3, i] * (np.float32(np.int32((w >> 28) & 15)) - eight)
                              + xs[4, i] * (np.float32(np.int32((u >> 8) & 15)) - eight)
                              + xs[5, i] * (np.float32(np.int32((u >> 12) & 15)) - eight)
                              + xs[6, i] * (np.float32(np.int32((u >> 24) & 15)) - eight)
                              + xs[7, i] * (np.float32(np.int32((u >> 28) & 15)) - eight))
            if (kt + 2) % tiles_per_group == 0:
                _close_group(acc0, acc8, result, scales[k0 // group_rows], scale_inv, c_begin, c_end)
        for n in range(n_words // 2):
            out[0, col0 + c_begin * 64 + n] = result[0, n]


@_kernel(parallel=True, fastmath=True)
def dequantize_word_order(marlin, scales_p, group_rows, kt_begin, kt_end, b_begin, b_end, out):
    """Marlin k-tiles [kt_begin, kt_end) x 16-word blocks [b_begin, b_end) -> float32 out
    [16*(kt_end-kt_begin), 8*(b_end-b_begin)] with columns in *word order*: column p = 8b + 2j + h
    (b counted from b_begin) holds half h (column c, or c+8) of word 16b + 4v + j.

    In this order each output row is written contiguously (a plain vector loop), where the
    natural order would scatter every word over two columns 8 apart. The large-M path multiplies
    in word order and gathers the product's columns back once; scales_p are the scales in the
    same column order.
    """
    for kt in prange(kt_begin, kt_end):
        g = (kt * 16) // group_rows
        base = (kt - kt_begin) * 16
        words = marlin[kt]
        for v in range(4):
            for dr in range(4):
                # Rows r, r+8, r+1, r+9 (r = 2v) sit in nibbles (0, 2), (1, 3), (4, 6), (5, 7).
                row = base + 2 * v + (0, 8, 1, 9)[dr]
                sh0 = (0, 4, 16, 20)[dr]
                sh1 = sh0 + 8
                dst = out[row]
                src = words[16 * b_begin:16 * b_end]      # zero-based loops vectorize; offset
                sc = scales_p[g, 8 * b_begin:8 * b_end]   # ones measured 2x slower
                for b in range(b_end - b_begin):
                    for j in range(4):
                        w = src[16 * b + 4 * v + j]
                        p = 8 * b + 2 * j
                        dst[p] = (np.float32(np.int32((w >> sh0) & 15)) - np.float32(8.0)) * sc[p]
                        dst[p + 1] = (np.float32(np.int32((w >> sh1) & 15)) - np.float32(8.0)) * sc[p + 1]


# Float16 conversions. Numba has no float16 arithmetic and numpy converts element by element
# (~5 ns each on x86 without AVX-512), which costs more than the dequantization at large M.
# Half values travel as their uint16 bits.

@_kernel(parallel=True)
def half_to_float(bits, table, perm, out):
    """out[m, k] = float(half bits[m, perm[k]]) through the exact 65536-entry table."""
    M, K = out.shape
    for m in prange(M):
        for k in range(K):
            out[m, k] = table[bits[m, perm[k]]]


@_kernel(parallel=True)
def float_to_half(values, bits, out):
    """out = float16 bits of float32 values (round to nearest even; overflow to inf; NaN kept).

    ``bits`` is the uint32 view of ``values``. Normal halves round by adding 0xfff plus the lowest
    kept mantissa bit before dropping 13 bits (a carry into the exponent is the right answer,
    also into inf); subnormal halves are multiples of 2^-24, rounded with rint.
    """
    M, N = values.shape
    for m in prange(M):
        for n in range(N):
            f = bits[m, n]
            sign = (f >> np.uint32(16)) & np.uint32(0x8000)
            a = f & np.uint32(0x7FFFFFFF)
            if a >= np.uint32(0x47800000):                      # >= 65536, inf or NaN
                h = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
            elif a < np.uint32(0x38800000):                     # below 2^-14: subnormal or 0
                h = np.uint32(np.rint(abs(values[m, n]) * np.float32(16777216.0)))
            else:
                odd = (a >> np.uint32(13)) & np.uint32(1)
                h = (a - np.uint32(0x38000000) + np.uint32(0xFFF) + odd) >> np.uint32(13)
            out[m, n] = np.uint16(sign | h)
